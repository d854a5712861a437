"""Frames that cross between parties: a fixed little-endian header, then a validated body.

No pickle, nothing executable: a frame is plain numbers and tensor bytes, and ``decode_*`` refuses
anything that does not match what the receiver expects (kind, codec, block, shapes, sizes, positions,
finiteness), naming the sender and the block.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from fedattn.errors import ProtocolError
from fedattn.network.kv_codec import CodecError, KVCodec, codec_by_code

MAGIC = b"FATN"
VERSION = 1
KIND_HELLO, KIND_KV, KIND_TOKEN, KIND_DONE = 1, 2, 3, 4
# SpecFed's frames (systems/specfed/frames.py): every system's kinds are numbered here, so none collide
KIND_SERVER_HELLO, KIND_WORKER_HELLO, KIND_DRAFT, KIND_ROWS, KIND_VERDICT = 5, 6, 7, 8, 9
# FedSEA's (systems/fedsea/frames.py)
KIND_SPLIT_HELLO, KIND_SPLIT_ANSWER, KIND_HIDDEN, KIND_SPLIT_DONE = 10, 11, 12, 13
# FedRefine's (systems/fedrefine/frames.py; a sharer's cache crosses as KIND_KV frames)
KIND_REFINE_HELLO, KIND_REFINE_ANSWER, KIND_REFINE_REQUEST = 14, 15, 16

# magic, version, kind, codec, flags, layer, kv heads, head dim, tokens, first position
KV_HEADER = struct.Struct("<4sBBBBHHHII")
# magic, version, kind, value (a token id, or the answer length)
SMALL_FRAME = struct.Struct("<4sBBQ")
# magic, version, kind, rank, world size, segment length, then one 8-byte fingerprint per field
HELLO_FIELDS = ("model weights", "model config", "schedule", "sparsity", "KV codec", "K/V exchange", "decoding")
HELLO_FRAME = struct.Struct("<4sBBHHI" + "8s" * len(HELLO_FIELDS))
FLAG_WHOLE_SEGMENT = 1  # positions are the sender's whole segment and are not sent
POSITION_BYTES = 4
MAX_TOKENS = 1 << 20  # the longest segment a party may announce, and so the largest KV frame


@dataclass(frozen=True)
class KVBlock:
    """One party's K/V at one block: tensors (heads, tokens, head_dim) and their global positions."""

    layer: int
    positions: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


@dataclass(frozen=True)
class KVExpectation:
    """What a receiver will accept from one sender at one block."""

    sender: str
    layer: int
    num_kv_heads: int
    head_dim: int
    max_tokens: int
    position_range: tuple[int, int]  # [lo, hi) of the sender's segment
    tokens: int | None = None  # exactly this many tokens (the run's plan), when known


def encode_kv(block: KVBlock, codec: KVCodec, whole_segment: bool) -> bytes:
    """``whole_segment``: the block covers every token of the sender's segment, so positions are implied."""
    num_heads, num_tokens, head_dim = block.key.shape
    header = KV_HEADER.pack(
        MAGIC,
        VERSION,
        KIND_KV,
        codec.code,
        FLAG_WHOLE_SEGMENT if whole_segment else 0,
        block.layer,
        num_heads,
        head_dim,
        num_tokens,
        int(block.positions[0]),
    )
    explicit = b"" if whole_segment else block.positions.to(torch.int32).numpy().tobytes()
    return header + explicit + codec.encode(block.key, block.value)


def kv_frame_size(num_tokens: int, whole_segment: bool, codec: KVCodec, num_kv_heads: int, head_dim: int) -> int:
    """The exact size of a KV frame: header, explicit positions unless whole-segment, payload."""
    positions = 0 if whole_segment else POSITION_BYTES * num_tokens
    return KV_HEADER.size + positions + codec.payload_size(num_tokens, num_kv_heads, head_dim)


def decode_kv(frame: bytes, expect: KVExpectation, codec: KVCodec) -> KVBlock:
    where = f"from {expect.sender} at block {expect.layer}"
    if len(frame) < KV_HEADER.size:
        raise ProtocolError(f"truncated KV frame {where}: {len(frame)} bytes, the header alone is {KV_HEADER.size}")
    magic, version, kind, codec_code, flags, layer, heads, head_dim, num_tokens, first = KV_HEADER.unpack_from(frame)
    check_preamble(magic, version, kind, KIND_KV, where)
    received_codec = codec_by_code(codec_code)
    if received_codec is None:
        raise ProtocolError(f"bad KV frame {where}: unknown codec code {codec_code}")
    if received_codec != codec:
        raise ProtocolError(f"bad KV frame {where}: codec {received_codec.name}, the run agreed on {codec.name}")
    if layer != expect.layer:
        raise ProtocolError(f"bad KV frame {where}: it is for block {layer}, out of order")
    if heads != expect.num_kv_heads or head_dim != expect.head_dim:
        raise ProtocolError(
            f"bad KV frame {where}: shape {heads} KV heads x {head_dim}, "
            f"the model has {expect.num_kv_heads} x {expect.head_dim}"
        )
    limit = min(expect.max_tokens, MAX_TOKENS)
    if not 0 < num_tokens <= limit:
        raise ProtocolError(f"bad KV frame {where}: {num_tokens} tokens, expected 1..{limit}")
    if expect.tokens is not None and num_tokens != expect.tokens:
        raise ProtocolError(f"bad KV frame {where}: {num_tokens} tokens, the run's plan sends {expect.tokens}")
    whole_segment = bool(flags & FLAG_WHOLE_SEGMENT)
    if flags & ~FLAG_WHOLE_SEGMENT:
        raise ProtocolError(f"bad KV frame {where}: unknown flags {flags:#x}")
    expected_size = kv_frame_size(num_tokens, whole_segment, codec, heads, head_dim)
    if len(frame) != expected_size:
        raise ProtocolError(f"bad KV frame {where}: {len(frame)} bytes where its header implies {expected_size}")
    offset = KV_HEADER.size
    if whole_segment:
        if num_tokens != expect.max_tokens or first != expect.position_range[0]:
            raise ProtocolError(
                f"bad KV frame {where}: marked whole-segment but covers {num_tokens} tokens from {first}"
            )
        positions = torch.arange(first, first + num_tokens)
    else:
        positions = torch.frombuffer(bytearray(frame[offset : offset + POSITION_BYTES * num_tokens]), dtype=torch.int32)
        positions = positions.to(torch.int64)
        offset += POSITION_BYTES * num_tokens
    _check_positions(positions, expect, where)
    try:
        key, value = codec.decode(memoryview(frame)[offset:], (heads, num_tokens, head_dim))
    except CodecError as error:
        raise ProtocolError(f"bad KV frame {where}: {error}") from None
    if not bool(torch.isfinite(key).all()) or not bool(torch.isfinite(value).all()):
        raise ProtocolError(f"bad KV frame {where}: non-finite values")
    return KVBlock(layer=layer, positions=positions, key=key, value=value)


def _check_positions(positions: torch.Tensor, expect: KVExpectation, where: str) -> None:
    lo, hi = expect.position_range
    if int(positions.min()) < lo or int(positions.max()) >= hi:
        raise ProtocolError(f"bad KV frame {where}: positions outside the sender's segment [{lo}, {hi})")
    if positions.numel() > 1 and not bool((positions[1:] > positions[:-1]).all()):
        raise ProtocolError(f"bad KV frame {where}: positions not strictly increasing")


@dataclass(frozen=True)
class Hello:
    """What a party announces before prefill: its segment length and what it runs."""

    rank: int
    world_size: int
    segment_length: int
    fingerprints: tuple[bytes, ...]  # one per HELLO_FIELDS entry


def encode_hello(hello: Hello) -> bytes:
    return HELLO_FRAME.pack(
        MAGIC, VERSION, KIND_HELLO, hello.rank, hello.world_size, hello.segment_length, *hello.fingerprints
    )


def decode_hello(frame: bytes, sender: str) -> Hello:
    where = f"from {sender} (handshake)"
    if len(frame) != HELLO_FRAME.size:
        raise ProtocolError(f"bad frame {where}: {len(frame)} bytes, expected {HELLO_FRAME.size}")
    magic, version, kind, rank, world_size, segment_length, *fingerprints = HELLO_FRAME.unpack(frame)
    check_preamble(magic, version, kind, KIND_HELLO, where)
    if not 0 < segment_length <= MAX_TOKENS:
        raise ProtocolError(f"bad frame {where}: segment length {segment_length}, expected 1..{MAX_TOKENS}")
    return Hello(rank, world_size, segment_length, tuple(fingerprints))


def encode_small(kind: int, value: int) -> bytes:
    return SMALL_FRAME.pack(MAGIC, VERSION, kind, value)


def decode_small(frame: bytes, kind: int, sender: str, what: str, upper: int) -> int:
    """A token or done frame; ``upper`` is the exclusive bound on its value."""
    where = f"from {sender} ({what})"
    if len(frame) != SMALL_FRAME.size:
        raise ProtocolError(f"bad frame {where}: {len(frame)} bytes, expected {SMALL_FRAME.size}")
    magic, version, received_kind, value = SMALL_FRAME.unpack(frame)
    check_preamble(magic, version, received_kind, kind, where)
    if not 0 <= value < upper:
        raise ProtocolError(f"bad frame {where}: value {value} outside [0, {upper})")
    return value


def reason_text(raw: bytes) -> str:
    """A peer's stated reason (a refusal) as printable text: it is shown to the user as it came."""
    text = raw.decode("utf-8", errors="replace")
    return "".join(character if character.isprintable() else "?" for character in text)


def check_preamble(magic: bytes, version: int, kind: int, expected_kind: int, where: str) -> None:
    """Every frame starts with MAGIC, VERSION and its kind: refuse another protocol, version or kind."""
    if magic != MAGIC:
        raise ProtocolError(f"bad frame {where}: not a fedattn frame")
    if version != VERSION:
        raise ProtocolError(f"bad frame {where}: protocol version {version}, this build speaks {VERSION}")
    if kind != expected_kind:
        raise ProtocolError(f"bad frame {where}: kind {kind}, expected {expected_kind}")
