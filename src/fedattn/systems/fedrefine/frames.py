"""FedRefine's frames: the common preamble (``network.frames``: MAGIC, VERSION, kind), fixed
little-endian fields, then a body; each ``decode_*`` refuses anything but what its receiver
expects, naming the sender. No pickle: token texts are length-prefixed UTF-8, ids are u32, and a
sharer's cache crosses as the network layer's K/V frames (``network.frames.encode_kv``, one per
sent block, through the run's ``KVCodec``), validated against the sharer model the hello named.

| frame   | from -> to        | fields after the 6-byte preamble                                    | bytes          |
|---------|-------------------|---------------------------------------------------------------------|----------------|
| hello   | receiver -> sharer| model 8s, codec u8, receiver blocks u16, most tokens u32,           | 22 + name      |
|         |                   | name length u8; the sharer model's name (UTF-8)                     |                |
| answer  | sharer -> receiver| accepted u8, tokenizer 8s, reason length u16; the reason (refusals) | 17 + reason    |
| request | receiver -> sharer| raw u8, mode u8 (ids / pieces), first position u32, count u32;      | 16 + 4 n, or   |
|         |                   | n ids u32, or n pieces each u16 length + UTF-8                      | 16 + sum(2 + l)|
| cache   | sharer -> receiver| ``network.frames`` K/V frame per sent block, whole-segment: its     | 22 + P each    |
|         |                   | header (codec, block, heads, head dim, n, first position), K and V  |                |

P is the codec's ``payload_size(n, heads_S, d_S)``: 2 n heads_S d_S b for a float codec of b bytes
per element. The hello names the sharer model the receiver's projectors were trained for (its
name and the first 8 bytes of its identity, ``runtime.models``); the sharer refuses another. The
answer carries the sharer's tokenizer fingerprint, so the receiver sends ids (same tokenizer) or
the text of each message token (another). A sharer that fails after accepting sends a refusal
answer in place of its first cache frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from fedattn.errors import ProtocolError
from fedattn.network.frames import (
    KIND_REFINE_ANSWER,
    KIND_REFINE_HELLO,
    KIND_REFINE_REQUEST,
    MAGIC,
    VERSION,
    KVBlock,
    KVExpectation,
    check_preamble,
    decode_kv,
    encode_kv,
    kv_frame_size,
    reason_text,
)
from fedattn.network.kv_codec import KVCodec, codec_by_code

HELLO = struct.Struct("<4sBB8sBHIB")
ANSWER = struct.Struct("<4sBBB8sH")
REQUEST = struct.Struct("<4sBBBBII")
ID = struct.Struct("<I")
PIECE_LENGTH = struct.Struct("<H")
MODE_IDS, MODE_PIECES = 0, 1
MAX_NAME = 255  # bytes of a model's name
MAX_REASON = 400  # bytes of a refusal's reason
MAX_TOKENS = 1 << 16  # the most tokens one request may carry
MAX_PIECE = 256  # bytes of one token's text
NO_TOKENIZER = bytes(8)


@dataclass(frozen=True)
class Hello:
    """What the receiver asks of a sharer: which model it must run (name, identity's first 8 bytes),
    the codec of its cache, how many blocks the receiver has (so which sharer blocks it maps:
    ``alignment.sent_blocks``) and the most tokens its request will carry."""

    model: bytes
    name: str
    codec: int
    receiver_blocks: int
    tokens: int


def encode_hello(hello: Hello) -> bytes:
    name = hello.name.encode()
    if len(name) > MAX_NAME:
        raise ValueError(f"a model name of {len(name)} bytes (at most {MAX_NAME})")
    fields = (hello.model, hello.codec, hello.receiver_blocks, hello.tokens, len(name))
    return HELLO.pack(MAGIC, VERSION, KIND_REFINE_HELLO, *fields) + name


def decode_hello(frame: bytes, sender: str) -> Hello:
    where = f"from {sender} (hello)"
    if len(frame) < HELLO.size:
        raise ProtocolError(f"bad frame {where}: {len(frame)} bytes, at least {HELLO.size} expected")
    magic, version, kind, model, codec, receiver_blocks, tokens, name_length = HELLO.unpack_from(frame)
    check_preamble(magic, version, kind, KIND_REFINE_HELLO, where)
    if len(frame) != HELLO.size + name_length:
        raise ProtocolError(f"bad frame {where}: {len(frame)} bytes, its header implies {HELLO.size + name_length}")
    if codec_by_code(codec) is None:
        raise ProtocolError(f"bad frame {where}: unknown KV codec {codec}")
    if receiver_blocks < 1:
        raise ProtocolError(f"bad frame {where}: a receiver of no blocks")
    if not 0 < tokens <= MAX_TOKENS:
        raise ProtocolError(f"bad frame {where}: {tokens} tokens, expected 1..{MAX_TOKENS}")
    name = _utf8(frame[HELLO.size :], where, "model name")
    return Hello(model, name, codec, receiver_blocks, tokens)


@dataclass(frozen=True)
class Answer:
    """A sharer's answer to the hello: accepted with its tokenizer's fingerprint, or refused, saying why."""

    tokenizer: bytes
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


def encode_answer(tokenizer: bytes | None, reason: str | None) -> bytes:
    """Accepted (``reason`` None, with the sharer's ``tokenizer`` fingerprint) or refused."""
    text = b"" if reason is None else reason.encode()[:MAX_REASON]
    fingerprint = NO_TOKENIZER if reason is not None else tokenizer
    return ANSWER.pack(MAGIC, VERSION, KIND_REFINE_ANSWER, reason is None, fingerprint, len(text)) + text


def is_answer(frame: bytes) -> bool:
    """A frame whose preamble says answer (a refusal may stand where a cache frame was due)."""
    return len(frame) > 5 and frame[5] == KIND_REFINE_ANSWER


def decode_answer(frame: bytes, sender: str) -> Answer:
    where = f"from {sender} (its answer)"
    if len(frame) < ANSWER.size:
        raise ProtocolError(f"bad frame {where}: {len(frame)} bytes")
    magic, version, kind, accepted, tokenizer, length = ANSWER.unpack_from(frame)
    check_preamble(magic, version, kind, KIND_REFINE_ANSWER, where)
    if accepted not in (0, 1) or length > MAX_REASON or len(frame) != ANSWER.size + length or (accepted and length):
        raise ProtocolError(f"bad frame {where}: malformed answer")
    if accepted:
        return Answer(tokenizer)
    return Answer(tokenizer, reason_text(frame[ANSWER.size :]))


@dataclass(frozen=True)
class Request:
    """What a sharer reads: the receiver's ids (same tokenizer) or the text of each receiver message
    token (another), whether to skip its own chat template's opening (``raw``), and the receiver
    position of the first token it sends back (the others follow, one per token)."""

    first: int
    raw: bool
    ids: list[int] | None = None
    pieces: list[str] | None = None

    @property
    def count(self) -> int:
        return len(self.ids if self.ids is not None else self.pieces or [])

    @property
    def positions(self) -> list[int]:
        return list(range(self.first, self.first + self.count))


def encode_request(request: Request) -> bytes:
    if request.ids is not None:
        mode, body = MODE_IDS, b"".join(ID.pack(token) for token in request.ids)
    else:
        mode, body = MODE_PIECES, b"".join(_piece(text) for text in request.pieces or [])
    header = REQUEST.pack(MAGIC, VERSION, KIND_REFINE_REQUEST, request.raw, mode, request.first, request.count)
    return header + body


def _piece(text: str) -> bytes:
    data = text.encode()
    if not 0 < len(data) <= MAX_PIECE:
        raise ValueError(f"a token text of {len(data)} bytes (1..{MAX_PIECE})")
    return PIECE_LENGTH.pack(len(data)) + data


def request_size(request: Request) -> int:
    """The exact bytes of a request frame."""
    if request.ids is not None:
        return REQUEST.size + ID.size * len(request.ids)
    return REQUEST.size + sum(PIECE_LENGTH.size + len(text.encode()) for text in request.pieces or [])


def decode_request(frame: bytes, sender: str, max_tokens: int, vocabulary: int) -> Request:
    """A request of 1..``max_tokens`` tokens (what the hello announced), ids below ``vocabulary``."""
    where = f"from {sender} (request)"
    if len(frame) < REQUEST.size:
        raise ProtocolError(f"bad frame {where}: {len(frame)} bytes, at least {REQUEST.size} expected")
    magic, version, kind, raw, mode, first, count = REQUEST.unpack_from(frame)
    check_preamble(magic, version, kind, KIND_REFINE_REQUEST, where)
    if raw not in (0, 1) or mode not in (MODE_IDS, MODE_PIECES):
        raise ProtocolError(f"bad frame {where}: flags raw {raw}, mode {mode}")
    if not 0 < count <= max_tokens:
        raise ProtocolError(f"bad frame {where}: {count} tokens, the hello announced at most {max_tokens}")
    if first + count > MAX_TOKENS:
        raise ProtocolError(f"bad frame {where}: positions {first}..{first + count - 1} beyond {MAX_TOKENS}")
    body = memoryview(frame)[REQUEST.size :]
    if mode == MODE_IDS:
        if len(body) != ID.size * count:
            raise ProtocolError(f"bad frame {where}: {len(frame)} bytes, expected {REQUEST.size + ID.size * count}")
        ids = [token for (token,) in ID.iter_unpack(body)]
        if max(ids) >= vocabulary:
            raise ProtocolError(f"bad frame {where}: token id {max(ids)} beyond the sharer's {vocabulary}")
        return Request(first, bool(raw), ids=ids)
    return Request(first, bool(raw), pieces=_pieces(body, count, where))


def _pieces(body: memoryview, count: int, where: str) -> list[str]:
    pieces, offset = [], 0
    for _ in range(count):
        if offset + PIECE_LENGTH.size > len(body):
            raise ProtocolError(f"bad frame {where}: truncated after {len(pieces)} of {count} token texts")
        (length,) = PIECE_LENGTH.unpack_from(body, offset)
        offset += PIECE_LENGTH.size
        if not 0 < length <= MAX_PIECE or offset + length > len(body):
            raise ProtocolError(f"bad frame {where}: token text {len(pieces)} of {length} bytes does not fit")
        pieces.append(_utf8(bytes(body[offset : offset + length]), where, "token text"))
        offset += length
    if offset != len(body):
        raise ProtocolError(f"bad frame {where}: {len(body) - offset} bytes after its {count} token texts")
    return pieces


def _utf8(data: bytes, where: str, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"bad frame {where}: a {what} that is not UTF-8") from None


@dataclass(frozen=True)
class CacheShape:
    """The cache a receiver accepts from one sharer: that model's KV heads and head size, its blocks
    in order, n tokens from receiver position ``first``, in ``codec``."""

    codec: KVCodec
    heads: int
    head_dim: int
    blocks: list[int]
    tokens: int
    first: int

    def frame_size(self) -> int:
        return kv_frame_size(self.tokens, True, self.codec, self.heads, self.head_dim)


def encode_cache_block(block: int, key: torch.Tensor, value: torch.Tensor, first: int, codec: KVCodec) -> bytes:
    """One sent block's K and V (heads, n, d) for receiver positions first..first + n - 1."""
    positions = torch.arange(first, first + key.shape[1])
    return encode_kv(KVBlock(block, positions, key, value), codec, whole_segment=True)


def decode_cache_block(frame: bytes, shape: CacheShape, index: int, sender: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``index``-th sent block's (K, V), or ProtocolError naming the sender and the block."""
    span = (shape.first, shape.first + shape.tokens)
    expect = KVExpectation(sender, shape.blocks[index], shape.heads, shape.head_dim, shape.tokens, span, shape.tokens)
    block = decode_kv(frame, expect, shape.codec)
    return block.key, block.value
