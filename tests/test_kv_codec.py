"""The K/V codecs: exact payload sizes (from the formulas written out here), reconstruction within
each scheme's error bound, and refusal of payloads no encoder produces."""

from __future__ import annotations

import struct

import pytest
import torch

from fedattn.errors import FedAttnError, ProtocolError
from fedattn.network.frames import (
    KV_HEADER,
    POSITION_BYTES,
    KVBlock,
    KVExpectation,
    decode_kv,
    encode_kv,
    kv_frame_size,
)
from fedattn.network.kv_codec import CODECS, get_codec

QUANTIZED = ["int8", "int4", "int8-kivi", "int4-kivi"]


def expected_payload(name: str, tokens: int, heads: int, head_dim: int) -> int:
    """The formulas of the README, written independently of the codec classes."""
    elements = tokens * heads * head_dim
    if name == "float32":
        return 2 * elements * 4
    if name in ("bfloat16", "float16"):
        return 2 * elements * 2
    codes = elements if name.startswith("int8") else (elements + 1) // 2  # int4: 2 per byte, padded
    per_token = heads * tokens  # one (scale, min) pair = 4 bytes per head and token
    per_channel = heads * head_dim
    if name in ("int8", "int4"):
        return 2 * (codes + 4 * per_token)
    value_groups = per_token * (head_dim // 32 if name == "int4-kivi" and head_dim % 32 == 0 else 1)
    return (codes + 4 * per_channel) + (codes + 4 * value_groups)


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 1, 1), (3, 1, 3), (5, 2, 16), (7, 2, 64), (33, 3, 96)])
def test_payload_size_formula_and_encoded_length(name, tokens, heads, head_dim):
    codec = get_codec(name)
    generator = torch.Generator().manual_seed(tokens * heads)
    key, value = torch.randn(2, heads, tokens, head_dim, generator=generator)
    assert codec.payload_size(tokens, heads, head_dim) == expected_payload(name, tokens, heads, head_dim)
    assert len(codec.encode(key, value)) == expected_payload(name, tokens, heads, head_dim)


def test_bytes_per_token_of_qwen_0_5b():
    """H_kv = 2, d_h = 64, per token and sync block with many tokens (per-channel scales amortized)."""
    per_token = {name: get_codec(name).payload_size(1000, 2, 64) / 1000 for name in CODECS}
    assert per_token["float32"] == 1024 and per_token["bfloat16"] == 512
    assert per_token["int8"] == 256 + 2 * 2 * 4
    assert per_token["int4"] == 128 + 2 * 2 * 4
    assert per_token["int8-kivi"] == 256 + 2 * 4 + 2 * 64 * 4 / 1000
    assert per_token["int4-kivi"] == 128 + 2 * 2 * 4 + 2 * 64 * 4 / 1000


def step_bound(x: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Half a quantization step of each group, plus float16 rounding of scale and minimum."""
    spread = x.amax(dim=dim, keepdim=True) - x.amin(dim=dim, keepdim=True)
    return spread / ((1 << bits) - 1) / 2 + (x.abs().amax(dim=dim, keepdim=True) + spread) * 1e-3


@pytest.mark.parametrize("name", QUANTIZED)
def test_round_trip_within_half_a_step(name):
    codec = get_codec(name)
    generator = torch.Generator().manual_seed(1)
    key = torch.randn(2, 9, 64, generator=generator) * torch.linspace(0.1, 20, 64)  # channel-dependent scales
    value = torch.randn(2, 9, 64, generator=generator) + 3
    decoded_key, decoded_value = codec.decode(memoryview(codec.encode(key, value)), (2, 9, 64))
    assert decoded_key.dtype == torch.float32 and decoded_key.shape == key.shape
    per_channel_keys = "kivi" in name
    assert bool(((decoded_key - key).abs() <= step_bound(key, 1 if per_channel_keys else 2, codec.bits)).all())
    if name == "int4-kivi":  # values in groups of 32 channels
        grouped = value.view(2, 9, 2, 32)
        error = (decoded_value.view(2, 9, 2, 32) - grouped).abs()
        assert bool((error <= step_bound(grouped, 3, codec.bits)).all())
    else:
        assert bool(((decoded_value - value).abs() <= step_bound(value, 2, codec.bits)).all())


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels():
    """Keys with a few huge channels (as LLM keys have): per-token scales waste their range."""
    generator = torch.Generator().manual_seed(2)
    key = torch.randn(2, 50, 64, generator=generator)
    key[:, :, 5] = key[:, :, 5] * 2 + 40
    value = torch.randn(2, 50, 64, generator=generator)

    def key_error(name: str) -> float:
        codec = get_codec(name)
        decoded, _ = codec.decode(memoryview(codec.encode(key, value)), (2, 50, 64))
        return float((decoded - key).norm() / key.norm())

    assert key_error("int8-kivi") < key_error("int8") / 4
    assert key_error("int4-kivi") < key_error("int4") / 4


@pytest.mark.parametrize("name", QUANTIZED)
def test_constant_and_single_token_tensors_are_exact(name):
    codec = get_codec(name)
    key = torch.full((2, 1, 16), 1.5)
    value = torch.full((2, 1, 16), -0.25)
    decoded_key, decoded_value = codec.decode(memoryview(codec.encode(key, value)), (2, 1, 16))
    assert torch.equal(decoded_key, key) and torch.equal(decoded_value, value)
    # values float16 cannot represent: a minimum rounded above the maximum must not give a negative scale
    generator = torch.Generator().manual_seed(9)
    key, value = torch.randn(2, 2, 1, 16, generator=generator) / 3
    decoded_key, decoded_value = codec.decode(memoryview(codec.encode(key, value)), (2, 1, 16))
    assert bool(((decoded_key - key).abs() <= step_bound(key, 2, codec.bits)).all())
    torch.testing.assert_close(decoded_value, value, atol=0.25, rtol=0)


@pytest.mark.parametrize("name", QUANTIZED)
def test_values_beyond_float16_scales_are_refused_at_the_sender(name):
    key = torch.zeros(1, 2, 4)
    key[0, 0, 0] = 1e6
    with pytest.raises(FedAttnError, match=f"cannot be carried by {name}'s float16 scales"):
        get_codec(name).encode(key, torch.zeros(1, 2, 4))


def test_aliases():
    assert get_codec("bf16") is CODECS["bfloat16"] and get_codec("fp32") is CODECS["float32"]
    assert get_codec("fp16") is CODECS["float16"]
    assert len({codec.code for codec in CODECS.values()}) == len(CODECS)


# ---------------------------------------------------------------------------------------------
# Receivers refuse what no encoder produces (through the wire layer, naming sender and block)

HEADS, HEAD_DIM, LO = 1, 3, 10  # 3 tokens x 1 head x 3 channels: 9 codes, odd (an int4 pad nibble)
TOKENS = 3


def frame_and_expectation(name: str) -> tuple[bytearray, KVExpectation]:
    generator = torch.Generator().manual_seed(3)
    shape = (HEADS, TOKENS, HEAD_DIM)
    block = KVBlock(
        3,
        torch.arange(LO, LO + TOKENS),
        torch.randn(shape, generator=generator),
        torch.randn(shape, generator=generator),
    )
    frame = bytearray(encode_kv(block, get_codec(name), whole_segment=True))
    assert len(frame) == kv_frame_size(TOKENS, True, get_codec(name), HEADS, HEAD_DIM)
    expect = KVExpectation("party-1", 3, HEADS, HEAD_DIM, TOKENS, (LO, LO + TOKENS))
    return frame, expect


def refused(frame: bytearray, expect: KVExpectation, name: str) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_kv(bytes(frame), expect, get_codec(name))
    assert "from party-1 at block 3" in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("tensor", ["key", "value"])
@pytest.mark.parametrize(
    "what,bad", [("scale", float("nan")), ("scale", float("inf")), ("min", float("-inf")), ("min", float("nan"))]
)
def test_non_finite_scales_are_refused(name, tensor, what, bad):
    frame, expect = frame_and_expectation(name)
    codec = get_codec(name)
    start = KV_HEADER.size
    if tensor == "value":
        start += codec._tensor_size(codec.keys, TOKENS, HEADS, HEAD_DIM)
    groups = (codec.keys if tensor == "key" else codec.values).count(TOKENS, HEADS, HEAD_DIM)
    offset = start + (0 if what == "scale" else 2 * groups)
    struct.pack_into("<e", frame, offset, bad)
    assert "non-finite quantization scales" in refused(frame, expect, name)


@pytest.mark.parametrize("name", QUANTIZED)
def test_negative_scales_are_refused(name):
    frame, expect = frame_and_expectation(name)
    struct.pack_into("<e", frame, KV_HEADER.size, -0.5)
    assert "negative quantization scales" in refused(frame, expect, name)


@pytest.mark.parametrize("name", ["int4", "int4-kivi"])
def test_int4_padding_nibble_must_be_zero(name):
    frame, expect = frame_and_expectation(name)
    codec = get_codec(name)
    key_end = KV_HEADER.size + codec._tensor_size(codec.keys, TOKENS, HEADS, HEAD_DIM)
    frame[key_end - 1] |= 0xF0  # the key's 9 codes end in the low nibble of their last byte
    assert "non-zero int4 padding nibble" in refused(frame, expect, name)


@pytest.mark.parametrize("name", QUANTIZED)
def test_truncated_quantized_payload(name):
    frame, expect = frame_and_expectation(name)
    assert "bytes where its header implies" in refused(frame[:-1], expect, name)
    # explicit positions are counted too
    assert kv_frame_size(2, False, get_codec(name), HEADS, HEAD_DIM) == (
        KV_HEADER.size + 2 * POSITION_BYTES + get_codec(name).payload_size(2, HEADS, HEAD_DIM)
    )
