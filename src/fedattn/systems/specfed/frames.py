"""SpecFed's frames: the common preamble (``network.frames``: MAGIC, VERSION, kind), then fixed
little-endian fields, then a body; each ``decode_*`` refuses anything but what its receiver expects,
naming the sender.

| frame        | from -> to      | fields after the 6-byte preamble                                 | bytes    |
|--------------|-----------------|------------------------------------------------------------------|----------|
| server hello | server -> each  | prompt length u32, vocab u32, tokenizer 8s, settings 8s; prompt  | 30 + 4 L |
| worker hello | worker -> server| tokenizer 8s, vocab u32, embedding rows u32                      | 22       |
| draft        | server -> each  | draft length n u16; the draft ids u32                            | 8 + 4 n  |
| rows         | worker -> server| encoding u8, flags u8, positions u16, K or cap u32 (0: full); body| below   |
| verdict      | server -> each  | accepted u16, next token u32, done u8                            | 13       |

A rows frame's body, for P positions keeping k_1..k_P tokens (k_j = V for full distributions):
each position's count minus 1 (adaptive only: the counts differ) in the id format, padded to a byte;
the ids of all positions in order (not for full distributions: every id, in id order); their
probabilities; each position's residual as float32 (when the layout sends it). In bytes, with b the
encoding's id bits (32, or ceil(log2 V) packed) and p its probability bits (32, 16, 8):
14 + [adaptive] ceil(P b / 8) + [not full] ceil(sum k_j b / 8) + sum k_j p / 8 + [residual] 4 P.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedattn.errors import FedAttnError, ProtocolError
from fedattn.network.frames import (
    KIND_DRAFT,
    KIND_ROWS,
    KIND_SERVER_HELLO,
    KIND_VERDICT,
    KIND_WORKER_HELLO,
    MAGIC,
    VERSION,
    check_preamble,
)
from fedattn.network.kv_codec import CodecError
from fedattn.network.topk_codec import RowEncoding, check_rows
from fedattn.systems.specfed.kernel import SparseRow

PREAMBLE = struct.Struct("<4sBB")  # magic, version, kind: what every frame starts with
# magic, version, kind, prompt length, vocab, tokenizer fingerprint, settings fingerprint; then the prompt
SERVER_HELLO = struct.Struct("<4sBBII8s8s")
# magic, version, kind, tokenizer fingerprint, vocab, embedding rows
WORKER_HELLO = struct.Struct("<4sBB8sII")
# magic, version, kind, draft length; then the draft ids
DRAFT_HEADER = struct.Struct("<4sBBH")
# magic, version, kind, accepted drafts, next token, done
VERDICT = struct.Struct("<4sBBHIB")
# magic, version, kind, encoding code, flags, positions, K (fixed) or cap (adaptive), 0 for full; then the body
ROWS_HEADER = struct.Struct("<4sBBBBHI")
TOKEN_BYTES = 4  # a prompt or draft id, u32
RESIDUAL_BYTES = 4  # a position's eps, float32
FLAG_FULL, FLAG_ADAPTIVE, FLAG_RESIDUAL = 1, 2, 4
MAX_PROMPT = 1 << 20  # the longest prompt a server may send
MAX_VOCAB = 1 << 31


@dataclass(frozen=True)
class RowLayout:
    """How a worker's rows are sent, agreed before decoding: encoding, real vocabulary size, K (None:
    the full distribution), adaptive (then K is the cap and each position sends its own count),
    residual (each position's eps is sent: the redistribute reconstruction needs it)."""

    encoding: RowEncoding
    vocab: int
    k: int | None
    adaptive: bool = False
    residual: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.vocab <= MAX_VOCAB:
            raise FedAttnError(f"vocabulary of {self.vocab} tokens, expected 1..{MAX_VOCAB}")
        if self.k is None and self.adaptive:
            raise FedAttnError("an adaptive K needs a cap: give K")
        if self.k is not None and not 0 < self.k <= self.vocab:
            raise FedAttnError(f"K = {self.k}, expected 1..{self.vocab} (the vocabulary)")

    @property
    def full(self) -> bool:
        return self.k is None

    @property
    def flags(self) -> int:
        return FLAG_FULL * self.full | FLAG_ADAPTIVE * self.adaptive | FLAG_RESIDUAL * self.residual


@dataclass(frozen=True)
class ServerHello:
    prompt: list[int]
    vocab: int
    tokenizer: bytes
    settings: bytes


@dataclass(frozen=True)
class WorkerHello:
    tokenizer: bytes
    vocab: int
    rows: int  # embedding rows, at least the vocabulary (padding rows)


@dataclass(frozen=True)
class Verdict:
    accepted: int  # drafts accepted, 0..draft length
    token: int  # the next token after them
    done: bool  # the answer is complete: workers stop


# -- sizes --------------------------------------------------------------------------------------------------------
def rows_frame_size(layout: RowLayout, counts: Sequence[int]) -> int:
    """Exact bytes of a rows frame whose positions keep ``counts`` tokens (k each for fixed K, V for full)."""
    kept = sum(counts)
    ids = layout.encoding.ids
    counts_bytes = ids.size(len(counts), layout.vocab) if layout.adaptive else 0
    ids_bytes = 0 if layout.full else ids.size(kept, layout.vocab)
    residual_bytes = RESIDUAL_BYTES * len(counts) if layout.residual else 0
    return ROWS_HEADER.size + counts_bytes + ids_bytes + layout.encoding.probabilities.size(kept) + residual_bytes


def draft_frame_size(draft_length: int) -> int:
    return DRAFT_HEADER.size + TOKEN_BYTES * draft_length


def verdict_frame_size() -> int:
    return VERDICT.size


def server_hello_size(prompt_length: int) -> int:
    return SERVER_HELLO.size + TOKEN_BYTES * prompt_length


def worker_hello_size() -> int:
    return WORKER_HELLO.size


# -- hellos -------------------------------------------------------------------------------------------------------
def encode_server_hello(hello: ServerHello) -> bytes:
    header = SERVER_HELLO.pack(
        MAGIC, VERSION, KIND_SERVER_HELLO, len(hello.prompt), hello.vocab, hello.tokenizer, hello.settings
    )
    return header + np.asarray(hello.prompt, dtype="<u4").tobytes()


def decode_server_hello(frame: bytes, sender: str) -> ServerHello:
    """A worker reads the server's hello. Whether its tokenizer is the worker's is the handshake's
    question (``roles.check_tokenizer``, a refusal in words rather than a bad frame)."""
    what = "server hello"
    where = f"bad {what} from {sender}"
    length, their_vocab, their_tokenizer, settings = _header(frame, SERVER_HELLO, KIND_SERVER_HELLO, sender, what)
    if length == 0:
        raise ProtocolError(f"{where}: empty prompt")
    if length > MAX_PROMPT:
        raise ProtocolError(f"{where}: prompt of {length} tokens, longer than the limit {MAX_PROMPT}")
    _check_length(frame, server_hello_size(length), where)
    if their_vocab == 0:
        raise ProtocolError(f"{where}: a vocabulary of 0 tokens")
    prompt = np.frombuffer(frame, dtype="<u4", offset=SERVER_HELLO.size)
    _check_tokens(prompt, their_vocab, f"{where}: prompt id")
    return ServerHello([int(token) for token in prompt], their_vocab, their_tokenizer, settings)


def encode_worker_hello(hello: WorkerHello) -> bytes:
    return WORKER_HELLO.pack(MAGIC, VERSION, KIND_WORKER_HELLO, hello.tokenizer, hello.vocab, hello.rows)


def decode_worker_hello(frame: bytes, sender: str) -> WorkerHello:
    """The server reads a worker's hello (the tokenizer is compared by ``roles.check_tokenizer``)."""
    what = "worker hello"
    where = f"bad {what} from {sender}"
    their_tokenizer, their_vocab, rows = _header(frame, WORKER_HELLO, KIND_WORKER_HELLO, sender, what)
    _check_length(frame, WORKER_HELLO.size, where)
    if their_vocab == 0:
        raise ProtocolError(f"{where}: a vocabulary of 0 tokens")
    if rows < their_vocab:
        raise ProtocolError(f"{where}: {rows} embedding rows, fewer than its vocabulary of {their_vocab}")
    return WorkerHello(their_tokenizer, their_vocab, rows)


# -- a round ------------------------------------------------------------------------------------------------------
def encode_draft(draft: Sequence[int]) -> bytes:
    return DRAFT_HEADER.pack(MAGIC, VERSION, KIND_DRAFT, len(draft)) + np.asarray(draft, dtype="<u4").tobytes()


def decode_draft(frame: bytes, sender: str, gamma: int, vocab: int) -> list[int]:
    """A worker reads a draft of at most ``gamma`` ids (0: plain ensemble decoding)."""
    what = "draft"
    where = f"bad {what} from {sender}"
    (length,) = _header(frame, DRAFT_HEADER, KIND_DRAFT, sender, what)
    if length > gamma:
        raise ProtocolError(f"{where}: {length} draft tokens, longer than gamma = {gamma}")
    _check_length(frame, draft_frame_size(length), where)
    draft = np.frombuffer(frame, dtype="<u4", offset=DRAFT_HEADER.size)
    _check_tokens(draft, vocab, f"{where}: draft id")
    return [int(token) for token in draft]


def encode_verdict(verdict: Verdict) -> bytes:
    return VERDICT.pack(MAGIC, VERSION, KIND_VERDICT, verdict.accepted, verdict.token, int(verdict.done))


def decode_verdict(frame: bytes, sender: str, draft_length: int, vocab: int) -> Verdict:
    """A worker reads the verdict on the draft of ``draft_length`` ids it was sent."""
    what = "verdict"
    where = f"bad {what} from {sender}"
    accepted, token, done = _header(frame, VERDICT, KIND_VERDICT, sender, what)
    _check_length(frame, VERDICT.size, where)
    if accepted > draft_length:
        raise ProtocolError(f"{where}: {accepted} drafts accepted of a draft of {draft_length}")
    if token >= vocab:
        raise ProtocolError(f"{where}: next token {token} outside [0, {vocab})")
    if done > 1:
        raise ProtocolError(f"{where}: done flag {done}, expected 0 or 1")
    return Verdict(accepted, token, bool(done))


def encode_rows(rows: Sequence[SparseRow], layout: RowLayout) -> bytes:
    """A worker's rows for one round; each must fit ``layout`` (a mismatch is the caller's bug: ValueError)."""
    counts = np.array([row.ids.numel() for row in rows], dtype=np.int64)
    _check_own_counts(rows, counts, layout)
    encoding = layout.encoding
    header = ROWS_HEADER.pack(
        MAGIC, VERSION, KIND_ROWS, encoding.code, layout.flags, len(rows), 0 if layout.full else layout.k
    )
    parts = [header]
    if layout.adaptive:
        parts.append(encoding.ids.encode(counts - 1, layout.vocab))
    if not layout.full:
        parts.append(encoding.ids.encode(torch.cat([row.ids for row in rows]).numpy(), layout.vocab))
    parts.append(encoding.probabilities.encode(torch.cat([row.probs for row in rows]).to(torch.float32).numpy()))
    if layout.residual:
        parts.append(np.array([row.residual for row in rows], dtype="<f4").tobytes())
    return b"".join(parts)


def decode_rows(frame: bytes, sender: str, layout: RowLayout, positions: int) -> list[SparseRow]:
    """The server reads a worker's ``positions`` rows (the draft's length + 1), validated (see
    ``network.topk_codec``). An unsent residual is 1 - the received mass, clamped to [0, 1]."""
    what = "rows"
    where = f"bad {what} from {sender}"
    code, flags, their_positions, k = _header(frame, ROWS_HEADER, KIND_ROWS, sender, what)
    encoding = layout.encoding
    if code != encoding.code:
        raise ProtocolError(f"{where}: encoding code {code}, expected {encoding.code} ({encoding.name})")
    if flags != layout.flags:
        raise ProtocolError(f"{where}: layout flags {flags:#x}, expected {layout.flags:#x}")
    if their_positions != positions:
        raise ProtocolError(f"{where}: {their_positions} positions, expected {positions}")
    if k != (layout.k or 0):
        raise ProtocolError(f"{where}: K = {k}, expected {layout.k or 0}")
    body = memoryview(frame)[ROWS_HEADER.size :]
    try:
        counts = _received_counts(body, layout, positions)
        _check_length(frame, rows_frame_size(layout, counts.tolist()), where)
        return _received_rows(body, layout, counts)
    except CodecError as error:
        raise ProtocolError(f"{where}: {error}") from None


def _received_counts(body: memoryview, layout: RowLayout, positions: int) -> np.ndarray:
    if not layout.adaptive:
        return np.full(positions, layout.vocab if layout.full else layout.k, dtype=np.int64)
    size = layout.encoding.ids.size(positions, layout.vocab)
    if len(body) < size:
        raise CodecError(f"truncated: {len(body)} body bytes, too few for {positions} counts")
    counts = layout.encoding.ids.decode(body, positions, layout.vocab) + 1
    empty, above = counts < 1, counts > layout.k
    if empty.any():
        raise CodecError(f"row {int(np.argmax(empty))}: no tokens kept (count {int(counts[empty][0])})")
    if above.any():
        row = int(np.argmax(above))
        raise CodecError(f"row {row}: {int(counts[row])} tokens kept, above the cap K = {layout.k}")
    return counts


def _received_rows(body: memoryview, layout: RowLayout, counts: np.ndarray) -> list[SparseRow]:
    encoding, vocab, kept = layout.encoding, layout.vocab, int(counts.sum())
    offset = encoding.ids.size(len(counts), vocab) if layout.adaptive else 0
    ids = None
    if not layout.full:
        ids = encoding.ids.decode(body[offset:], kept, vocab)
        offset += encoding.ids.size(kept, vocab)
    probs = encoding.probabilities.decode(body[offset:], kept)
    offset += encoding.probabilities.size(kept)
    residuals = np.frombuffer(body[offset:], dtype="<f4", count=len(counts)) if layout.residual else None
    check_rows(ids, probs, counts, residuals, vocab, encoding.probabilities)
    if residuals is None:
        sums = np.bincount(np.repeat(np.arange(len(counts)), counts), weights=probs.astype(np.float64))
        residuals = np.clip(1 - sums, 0, 1)
    sizes = counts.tolist()
    rows_ids = [torch.arange(vocab)] * len(sizes) if ids is None else torch.from_numpy(ids).split(sizes)
    rows_probs = torch.from_numpy(probs).split(sizes)
    return [
        SparseRow(ids=row_ids, probs=row_probs, residual=float(residual))
        for row_ids, row_probs, residual in zip(rows_ids, rows_probs, residuals)
    ]


def _check_own_counts(rows: Sequence[SparseRow], counts: np.ndarray, layout: RowLayout) -> None:
    if layout.full:
        in_order = torch.arange(layout.vocab)
        if (counts != layout.vocab).any() or any(not torch.equal(row.ids, in_order) for row in rows):
            raise ValueError(f"a full-distribution row must hold all {layout.vocab} ids in id order")
    elif layout.adaptive:
        if (counts < 1).any() or (counts > layout.k).any():
            raise ValueError(f"an adaptive row keeps 1..{layout.k} tokens, not {counts.tolist()}")
    elif (counts != layout.k).any():
        raise ValueError(f"a fixed-K row keeps {layout.k} tokens, not {counts.tolist()}")


def _check_tokens(tokens: np.ndarray, vocab: int, what: str) -> None:
    outside = tokens >= vocab
    if outside.any():
        raise ProtocolError(f"{what} {int(tokens[outside][0])} outside [0, {vocab})")


def _check_length(frame: bytes, size: int, where: str) -> None:
    if len(frame) != size:
        raise ProtocolError(f"{where}: {len(frame)} bytes, expected {size}")


def _header(frame: bytes, header: struct.Struct, kind: int, sender: str, what: str) -> tuple:
    """The fields of ``header`` after the preamble, which is checked first: a frame of another kind is named so."""
    where = f"bad {what} from {sender}"
    if len(frame) < PREAMBLE.size:
        raise ProtocolError(f"{where}: truncated at {len(frame)} bytes, shorter than the {PREAMBLE.size}-byte preamble")
    check_preamble(*PREAMBLE.unpack_from(frame), kind, f"from {sender} ({what})")
    if len(frame) < header.size:
        raise ProtocolError(f"{where}: truncated at {len(frame)} bytes, shorter than its {header.size}-byte header")
    return header.unpack_from(frame)[3:]  # after magic, version, kind
