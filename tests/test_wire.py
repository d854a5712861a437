"""Frames received from another party are validated before use; the in-process transport delivers them.

Corrupt frames are made by patching header fields of a valid frame with ``struct`` (the layout is
``wire.KV_HEADER``), or payload bytes in place, so each test exercises exactly one defect.
"""

from __future__ import annotations

import math
import struct
import time

import pytest
import torch

from fedattn.errors import FedAttnError, ProtocolError
from fedattn.network.frames import (
    FLAG_WHOLE_SEGMENT,
    KIND_DONE,
    KIND_KV,
    KIND_TOKEN,
    KV_HEADER,
    MAGIC,
    MAX_TOKENS,
    POSITION_BYTES,
    SMALL_FRAME,
    VERSION,
    KVBlock,
    KVExpectation,
    decode_kv,
    decode_small,
    encode_kv,
    encode_small,
    kv_frame_size,
)
from fedattn.network.kv_codec import CODECS, get_codec
from fedattn.network.transport import InProcessGrid

HEADS, HEAD_DIM = 2, 16
LAYER = 3
SENDER = "party-1"
LO, SEGMENT = 10, 6  # the sender's segment is positions [10, 16)
HI = LO + SEGMENT
WHERE = f"from {SENDER} at block {LAYER}"

FIELDS = ("magic", "version", "kind", "codec", "flags", "layer", "heads", "head_dim", "tokens", "first")
OFFSET = {name: offset for name, offset in zip(FIELDS, (0, 4, 5, 6, 7, 8, 10, 12, 14, 18))}

F32, BF16, F16, INT8 = CODECS["float32"], CODECS["bfloat16"], CODECS["float16"], CODECS["int8"]


def make_block(positions: list[int], layer: int = LAYER, seed: int = 0) -> KVBlock:
    generator = torch.Generator().manual_seed(seed)
    shape = (HEADS, len(positions), HEAD_DIM)
    return KVBlock(
        layer=layer,
        positions=torch.tensor(positions, dtype=torch.int64),
        key=torch.randn(shape, generator=generator),
        value=torch.randn(shape, generator=generator),
    )


def expectation(max_tokens: int = SEGMENT, lo: int = LO, layer: int = LAYER) -> KVExpectation:
    return KVExpectation(
        sender=SENDER,
        layer=layer,
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        max_tokens=max_tokens,
        position_range=(lo, lo + max_tokens),
    )


WHOLE = list(range(LO, HI))
PARTIAL = [LO + 1, LO + 3, LO + 4]


def whole_frame(codec=F32) -> bytes:
    return encode_kv(make_block(WHOLE), codec, whole_segment=True)


def partial_frame(codec=F32) -> bytes:
    return encode_kv(make_block(PARTIAL), codec, whole_segment=False)


def patch(frame: bytes, **fields) -> bytes:
    """The frame with some header fields replaced (the body is kept as is)."""
    values = dict(zip(FIELDS, KV_HEADER.unpack_from(frame)))
    unknown = set(fields) - set(values)
    assert not unknown, unknown
    values.update(fields)
    return KV_HEADER.pack(*(values[name] for name in FIELDS)) + frame[KV_HEADER.size :]


def patch_positions(frame: bytes, positions: list[int]) -> bytes:
    """A partial frame with its explicit positions replaced (same count)."""
    body = bytearray(frame)
    struct.pack_into(f"<{len(positions)}i", body, KV_HEADER.size, *positions)
    return bytes(body)


def rejected(frame: bytes, expect: KVExpectation | None = None, codec=F32) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_kv(frame, expect or expectation(), codec)
    message = str(info.value)
    assert SENDER in message and f"block {LAYER}" in message, message
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Layout and valid round trips


def test_header_layout_matches_the_patch_helper():
    assert KV_HEADER.size == 22
    frame = whole_frame()
    widths = dict(zip(FIELDS, (4, 1, 1, 1, 1, 2, 2, 2, 4, 4)))
    for name, value in [
        ("version", 9),
        ("kind", 7),
        ("codec", 5),
        ("flags", 0x80),
        ("layer", 513),
        ("heads", 258),
        ("head_dim", 259),
        ("tokens", 0x01020304),
        ("first", 0x0A0B0C0D),
    ]:
        patched = patch(frame, **{name: value})
        assert int.from_bytes(patched[OFFSET[name] : OFFSET[name] + widths[name]], "little") == value, name
        assert patched[KV_HEADER.size :] == frame[KV_HEADER.size :]
    assert frame[:4] == MAGIC and frame[4] == VERSION and frame[5] == KIND_KV and frame[6] == F32.code
    assert frame[7] == FLAG_WHOLE_SEGMENT and partial_frame()[7] == 0


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "partial"])
def test_float32_round_trip_is_bit_exact(whole):
    positions = WHOLE if whole else PARTIAL
    block = make_block(positions)
    frame = encode_kv(block, F32, whole_segment=whole)
    assert len(frame) == kv_frame_size(len(positions), whole, F32, HEADS, HEAD_DIM)
    assert (
        len(frame)
        == KV_HEADER.size
        + (0 if whole else POSITION_BYTES * len(positions))
        + 2 * HEADS * len(positions) * HEAD_DIM * 4
    )
    decoded = decode_kv(frame, expectation(), F32)
    assert decoded.layer == LAYER
    assert decoded.positions.tolist() == positions
    assert decoded.key.dtype == torch.float32 and decoded.value.dtype == torch.float32
    assert decoded.key.shape == (HEADS, len(positions), HEAD_DIM)
    assert torch.equal(decoded.key, block.key) and torch.equal(decoded.value, block.value)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "partial"])
def test_half_precision_round_trip_matches_the_codec(name, whole):
    codec = get_codec(name)
    positions = WHOLE if whole else PARTIAL
    block = make_block(positions)
    frame = encode_kv(block, codec, whole_segment=whole)
    assert len(frame) == kv_frame_size(len(positions), whole, codec, HEADS, HEAD_DIM)
    assert codec.bytes_per_element == 2
    decoded = decode_kv(frame, expectation(), codec)
    assert decoded.positions.tolist() == positions
    payload = memoryview(frame)[len(frame) - codec.payload_size(len(positions), HEADS, HEAD_DIM) :]
    key, value = codec.decode(payload, (HEADS, len(positions), HEAD_DIM))
    assert decoded.key.dtype == codec.dtype
    assert torch.equal(decoded.key, key) and torch.equal(decoded.value, value)
    # exactly the cast of the original, and close to it within the dtype's precision
    assert torch.equal(decoded.key, block.key.to(codec.dtype)) and torch.equal(
        decoded.value, block.value.to(codec.dtype)
    )
    eps = torch.finfo(codec.dtype).eps
    torch.testing.assert_close(decoded.key.float(), block.key, rtol=eps, atol=1e-6)
    torch.testing.assert_close(decoded.value.float(), block.value, rtol=eps, atol=1e-6)


def test_single_token_partial_frame():
    frame = encode_kv(make_block([HI - 1]), F32, whole_segment=False)
    assert decode_kv(frame, expectation(), F32).positions.tolist() == [HI - 1]


# ---------------------------------------------------------------------------------------------
# Preamble and codec


@pytest.mark.parametrize("make", [whole_frame, partial_frame], ids=["whole", "partial"])
def test_wrong_magic(make):
    assert "not a fedattn frame" in rejected(patch(make(), magic=b"FATX"))
    assert "not a fedattn frame" in rejected(patch(make(), magic=b"\0\0\0\0"))


def test_wrong_version():
    message = rejected(patch(whole_frame(), version=VERSION + 1))
    assert f"protocol version {VERSION + 1}, this build speaks {VERSION}" in message
    assert "protocol version 0" in rejected(patch(whole_frame(), version=0))


@pytest.mark.parametrize("kind", [KIND_DONE, KIND_TOKEN, 0, 255])
def test_wrong_kind(kind):
    assert f"kind {kind}, expected {KIND_KV}" in rejected(patch(whole_frame(), kind=kind))


@pytest.mark.parametrize("code", [0, 8, 99, 255])
def test_unknown_codec_code(code):
    assert f"unknown codec code {code}" in rejected(patch(whole_frame(), codec=code))


def test_dtype_differing_from_the_agreed_codec():
    # a float32 frame relabelled as bfloat16, and a genuine bfloat16 frame sent to a float32 run
    assert "codec bfloat16, the run agreed on float32" in rejected(patch(whole_frame(), codec=BF16.code))
    assert "codec bfloat16, the run agreed on float32" in rejected(whole_frame(BF16), codec=F32)
    assert "codec float32, the run agreed on float16" in rejected(whole_frame(F32), codec=F16)
    assert "codec int8, the run agreed on int8-kivi" in rejected(whole_frame(INT8), codec=get_codec("int8-kivi"))


# ---------------------------------------------------------------------------------------------
# Shape and token count


def test_wrong_head_count():
    message = rejected(patch(whole_frame(), heads=HEADS + 1))
    assert f"shape {HEADS + 1} KV heads x {HEAD_DIM}, the model has {HEADS} x {HEAD_DIM}" in message
    assert "shape 0 KV heads" in rejected(patch(whole_frame(), heads=0))


def test_wrong_head_dim():
    message = rejected(patch(whole_frame(), head_dim=HEAD_DIM // 2))
    assert f"shape {HEADS} KV heads x {HEAD_DIM // 2}, the model has {HEADS} x {HEAD_DIM}" in message
    assert "x 65535, the model has" in rejected(patch(whole_frame(), head_dim=0xFFFF))


def test_zero_tokens():
    assert f"0 tokens, expected 1..{SEGMENT}" in rejected(patch(partial_frame(), tokens=0))
    assert f"0 tokens, expected 1..{SEGMENT}" in rejected(patch(whole_frame(), tokens=0))


def test_token_count_above_max_tokens():
    # more tokens than the sender's segment has, even with a body of the right size
    frame = encode_kv(make_block(list(range(LO, HI + 1))), F32, whole_segment=False)
    assert f"{SEGMENT + 1} tokens, expected 1..{SEGMENT}" in rejected(frame)
    assert f"{SEGMENT + 1} tokens, expected 1..{SEGMENT}" in rejected(patch(whole_frame(), tokens=SEGMENT + 1))


@pytest.mark.parametrize("tokens", [MAX_TOKENS + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_huge_token_count_is_refused_before_reading_the_body(tokens):
    """A header claiming gigabytes is refused from the header alone, quickly."""
    start = time.perf_counter()
    assert f"{tokens} tokens, expected 1..{SEGMENT}" in rejected(patch(whole_frame(), tokens=tokens))
    # even when the sender's segment is announced as larger than a frame may carry
    big = expectation(max_tokens=1 << 24)
    message = rejected(patch(whole_frame(), tokens=tokens), big)
    assert f"{tokens} tokens, expected 1..{MAX_TOKENS}" in message
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------------------------------------
# Frame length


@pytest.mark.parametrize("make", [whole_frame, partial_frame], ids=["whole", "partial"])
def test_extra_byte(make):
    frame = make()
    assert f"{len(frame) + 1} bytes where its header implies {len(frame)}" in rejected(frame + b"\0")


@pytest.mark.parametrize("make", [whole_frame, partial_frame], ids=["whole", "partial"])
def test_missing_byte_and_truncated_payload(make):
    frame = make()
    assert f"{len(frame) - 1} bytes where its header implies {len(frame)}" in rejected(frame[:-1])
    half = len(frame) // 2
    assert f"{half} bytes where its header implies {len(frame)}" in rejected(frame[:half])
    assert f"{KV_HEADER.size} bytes where its header implies {len(frame)}" in rejected(frame[: KV_HEADER.size])


def test_token_count_not_matching_the_body():
    frame = partial_frame()  # 3 tokens; the header now claims 2, then 4
    assert "bytes where its header implies" in rejected(patch(frame, tokens=2))
    assert "bytes where its header implies" in rejected(patch(frame, tokens=4))


@pytest.mark.parametrize("length", [0, 1, 4, KV_HEADER.size - 1])
def test_truncated_header(length):
    message = rejected(whole_frame()[:length])
    assert f"truncated KV frame {WHERE}: {length} bytes, the header alone is {KV_HEADER.size}" in message


# ---------------------------------------------------------------------------------------------
# Values


NON_FINITE = {
    "float32": {
        "nan": struct.pack("<f", math.nan),
        "inf": struct.pack("<f", math.inf),
        "-inf": struct.pack("<f", -math.inf),
    },
    "bfloat16": {"nan": b"\xc0\x7f", "inf": b"\x80\x7f", "-inf": b"\x80\xff"},
    "float16": {"nan": b"\x00\x7e", "inf": b"\x00\x7c", "-inf": b"\x00\xfc"},
}


@pytest.mark.parametrize("name", list(NON_FINITE))
@pytest.mark.parametrize("special", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("make", [whole_frame, partial_frame], ids=["whole", "partial"])
def test_non_finite_values(name, special, where, make):
    codec = get_codec(name)
    frame = bytearray(make(codec))
    tokens = KV_HEADER.unpack_from(frame)[8]
    payload_start = len(frame) - codec.payload_size(tokens, HEADS, HEAD_DIM)
    half = codec.payload_size(tokens, HEADS, HEAD_DIM) // 2
    element = (half if where == "value" else 0) + 5 * codec.bytes_per_element
    bad = NON_FINITE[name][special]
    frame[payload_start + element : payload_start + element + len(bad)] = bad
    assert "non-finite values" in rejected(bytes(frame), codec=codec)


# ---------------------------------------------------------------------------------------------
# Block and positions


@pytest.mark.parametrize("layer", [LAYER - 1, LAYER + 1, 0, 0xFFFF])
def test_block_index_out_of_order(layer):
    assert f"it is for block {layer}, out of order" in rejected(patch(whole_frame(), layer=layer))


@pytest.mark.parametrize(
    "positions", [[LO - 1, LO, LO + 1], [LO, LO + 1, HI], [LO, LO + 1, HI + 100], [-1, LO, LO + 1], [0, 1, 2]]
)
def test_positions_outside_the_segment(positions):
    message = rejected(patch_positions(partial_frame(), positions))
    assert f"positions outside the sender's segment [{LO}, {HI})" in message


@pytest.mark.parametrize("positions", [[LO + 3, LO + 1, LO + 4], [LO + 1, LO + 1, LO + 4], [LO + 4, LO + 3, LO + 1]])
def test_positions_not_increasing(positions):
    assert "positions not strictly increasing" in rejected(patch_positions(partial_frame(), positions))


def test_whole_segment_flag_with_a_partial_block():
    # a genuine whole-segment frame for 6 tokens, received where the sender's segment has 8
    longer = expectation(max_tokens=SEGMENT + 2)
    message = rejected(whole_frame(), longer)
    assert f"marked whole-segment but covers {SEGMENT} tokens from {LO}" in message
    # a whole-segment frame that does not start at the segment's first position
    message = rejected(patch(whole_frame(), first=LO + 1))
    assert f"marked whole-segment but covers {SEGMENT} tokens from {LO + 1}" in message
    # a partial frame relabelled whole-segment, its explicit positions dropped to keep the size right
    frame = partial_frame()
    relabelled = patch(frame, flags=FLAG_WHOLE_SEGMENT)
    relabelled = relabelled[: KV_HEADER.size] + relabelled[KV_HEADER.size + POSITION_BYTES * len(PARTIAL) :]
    assert f"marked whole-segment but covers {len(PARTIAL)} tokens" in rejected(relabelled)


@pytest.mark.parametrize("flags", [0x2, 0x3, 0x80, 0xFF])
def test_unknown_flag_bits(flags):
    assert f"unknown flags {flags:#x}" in rejected(patch(whole_frame(), flags=flags))


def test_the_first_position_field_of_a_partial_frame_is_not_trusted():
    """Partial frames carry explicit positions; the header's first position is informational only."""
    decoded = decode_kv(patch(partial_frame(), first=0), expectation(), F32)
    assert decoded.positions.tolist() == PARTIAL


# ---------------------------------------------------------------------------------------------
# Small frames (token, completion)


def test_small_frame_round_trip():
    assert len(encode_small(KIND_DONE, 7)) == SMALL_FRAME.size == 14
    assert decode_small(encode_small(KIND_DONE, 7), KIND_DONE, SENDER, "completion", 1 << 24) == 7
    assert decode_small(encode_small(KIND_TOKEN, 0), KIND_TOKEN, "publisher", "first token", 259) == 0
    assert decode_small(encode_small(KIND_TOKEN, 258), KIND_TOKEN, "publisher", "first token", 259) == 258


def small_rejected(frame: bytes, kind: int = KIND_DONE, upper: int = 100) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_small(frame, kind, SENDER, "completion", upper)
    message = str(info.value)
    assert f"from {SENDER} (completion)" in message, message
    return message


@pytest.mark.parametrize("delta", [-1, 1, -SMALL_FRAME.size, KV_HEADER.size])
def test_small_frame_wrong_size(delta):
    frame = encode_small(KIND_DONE, 5)
    wrong = frame[:delta] if delta < 0 else frame + b"\0" * delta
    assert f"{len(wrong)} bytes, expected {SMALL_FRAME.size}" in small_rejected(wrong)


def test_small_frame_wrong_kind():
    assert f"kind {KIND_TOKEN}, expected {KIND_DONE}" in small_rejected(encode_small(KIND_TOKEN, 5))
    assert f"kind {KIND_KV}, expected {KIND_TOKEN}" in small_rejected(encode_small(KIND_KV, 5), kind=KIND_TOKEN)


def test_small_frame_wrong_magic_and_version():
    assert "not a fedattn frame" in small_rejected(SMALL_FRAME.pack(b"XXXX", VERSION, KIND_DONE, 5))
    assert f"protocol version 7, this build speaks {VERSION}" in small_rejected(
        SMALL_FRAME.pack(MAGIC, 7, KIND_DONE, 5)
    )


@pytest.mark.parametrize("value", [100, 101, (1 << 64) - 1])
def test_small_frame_value_out_of_range(value):
    assert f"value {value} outside [0, 100)" in small_rejected(encode_small(KIND_DONE, value))


# ---------------------------------------------------------------------------------------------
# In-process transport


NAMES = ["party-1", "party-2", "publisher"]


def test_recv_with_nothing_sent_fails_quickly_naming_both_parties():
    grid = InProcessGrid(NAMES, timeout=0.0)
    publisher = grid.endpoint(2)
    start = time.perf_counter()
    with pytest.raises(FedAttnError) as info:
        publisher.recv(0)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "publisher" in message and "party-1" in message and "no frame arrived" in message
    assert publisher.stats.bytes_received == 0 and publisher.stats.frames_received == 0


def test_recv_after_the_queue_drains_fails_too():
    grid = InProcessGrid(NAMES, timeout=0.0)
    grid.endpoint(0).send(b"one", [1])
    second = grid.endpoint(1)
    assert second.recv(0) == b"one"
    with pytest.raises(FedAttnError, match="party-2 waited .* from party-1"):
        second.recv(0)


def test_per_pair_fifo_order():
    grid = InProcessGrid(NAMES, timeout=0.0)
    ends = [grid.endpoint(rank) for rank in range(3)]
    for index in range(5):
        ends[0].send(f"a{index}".encode(), [2])
        ends[1].send(f"b{index}".encode(), [2])
        ends[0].send(f"c{index}".encode(), [1, 2])
    assert grid.pending() == 20
    # the publisher drains party-2 first: order within a pair does not depend on other pairs
    assert [ends[2].recv(1) for _ in range(5)] == [f"b{i}".encode() for i in range(5)]
    expected = [f"{p}{i}".encode() for i in range(5) for p in "ac"]
    assert [ends[2].recv(0) for _ in range(10)] == expected
    assert [ends[1].recv(0) for _ in range(5)] == [f"c{i}".encode() for i in range(5)]
    assert grid.pending() == 0


def test_bytes_counted_once_per_multicast_send_and_per_receiver():
    grid = InProcessGrid(NAMES, timeout=0.0)
    ends = [grid.endpoint(rank) for rank in range(3)]
    frame = whole_frame()
    ends[0].send(frame, [1, 2])
    ends[0].send(b"x" * 10, [2])
    ends[0].send(b"ignored", [])  # no addressee: nothing crosses
    assert ends[0].stats.bytes_sent == len(frame) + 10
    assert ends[0].stats.frames_sent == 2
    assert grid.pending() == 3
    assert ends[1].recv(0) == frame
    assert ends[2].recv(0) == frame and ends[2].recv(0) == b"x" * 10
    assert (ends[1].stats.bytes_received, ends[1].stats.frames_received) == (len(frame), 1)
    assert (ends[2].stats.bytes_received, ends[2].stats.frames_received) == (len(frame) + 10, 2)
    assert ends[0].stats.bytes_received == 0 and ends[1].stats.bytes_sent == 0
    # per peer, a multicast frame counts for each addressee
    assert (ends[0].stats.peer(1).bytes_sent, ends[0].stats.peer(2).bytes_sent) == (len(frame), len(frame) + 10)
    assert (ends[0].stats.peer(1).frames_sent, ends[0].stats.peer(2).frames_sent) == (1, 2)
    assert ends[2].stats.peer(0).bytes_received == len(frame) + 10 and ends[2].stats.peer(1).bytes_received == 0
    # a received frame decodes to what was sent
    assert torch.equal(decode_kv(frame, expectation(), F32).key, make_block(WHOLE).key)


def test_invalid_addressee_is_refused():
    grid = InProcessGrid(NAMES, timeout=0.0)
    sender = grid.endpoint(0)
    with pytest.raises(ValueError):
        sender.send(b"self", [0])
    with pytest.raises(ValueError):
        sender.send(b"nobody", [3])
    assert sender.stats.bytes_sent == 0
