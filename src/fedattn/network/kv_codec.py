"""How K/V tensors become payload bytes and back: the codec on the wire (``--kv-codec``).

A codec is chosen once per run and agreed by all parties (it is in the handshake); the wire layer
names it in each frame's header so a receiver can refuse anything else. Codecs sit exactly at the
serialization boundary, so the bytes a run reports are the bytes that were sent, and each has an
exact ``payload_size`` formula that the cost model uses.

Float codecs cast (float32, bfloat16, float16). Quantized codecs store integer codes plus, per
quantization group, a float16 scale and a float16 minimum (asymmetric min/max quantization:
x ~ min + q * scale, q in 0..2^bits - 1). Layout of each of K and V, K first:
``scales (S x f16) | minimums (S x f16) | codes``, codes row-major over (head, token, channel);
int4 codes pack two per byte, the first in the low nibble, and a tensor with an odd number of
codes ends with a zero padding nibble. S, the number of groups, depends on the grouping:

- ``int8`` / ``int4``: per token, one group per (head, token): S = H * T.
- ``int8-kivi``: keys per channel (one group per (head, channel) over the frame's tokens,
  S = H * D: outlier channels get their own range), values per token (S = H * T) -- KIVI's split.
- ``int4-kivi``: as ``int8-kivi`` in 4 bits, values in groups of 32 channels per token
  (S = H * T * D / 32; one group per token when 32 does not divide D).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fedattn.errors import FedAttnError

SCALE_BYTES = 4  # a float16 scale and a float16 minimum per group
FLOAT16_MAX = 65504.0


class CodecError(ValueError):
    """A payload that does not decode (the wire layer adds the sender and block)."""


class KVCodec(ABC):
    """K/V of shape (heads, tokens, head_dim) <-> payload bytes."""

    name: str
    code: int

    @abstractmethod
    def payload_size(self, num_tokens: int, num_kv_heads: int, head_dim: int) -> int:
        """Exact bytes of K and V together for ``num_tokens`` tokens."""

    @abstractmethod
    def encode(self, key: torch.Tensor, value: torch.Tensor) -> bytes:
        """K and V (heads, tokens, head_dim) -> bytes, K first."""

    @abstractmethod
    def decode(self, payload: memoryview, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """bytes -> (K, V), each (heads, tokens, head_dim); the caller checked the length.
        Raises ``CodecError`` on content no encoder produces (bad scales, padding)."""

    # one tensor of (tokens, width), such as split inference's hidden states: coded like V alone
    @abstractmethod
    def tensor_size(self, num_tokens: int, width: int) -> int:
        """Exact bytes of one (tokens, width) tensor."""

    @abstractmethod
    def encode_tensor(self, x: torch.Tensor) -> bytes:
        """(tokens, width) -> bytes."""

    @abstractmethod
    def decode_tensor(self, payload: memoryview, num_tokens: int, width: int) -> torch.Tensor:
        """bytes -> (tokens, width); the caller checked the length (``CodecError`` as ``decode``)."""


@dataclass(frozen=True)
class FloatCodec(KVCodec):
    """K and V cast to ``dtype``, little-endian, row-major."""

    name: str
    code: int
    dtype: torch.dtype

    @property
    def bytes_per_element(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def payload_size(self, num_tokens: int, num_kv_heads: int, head_dim: int) -> int:
        """2 * T * H * D * b."""
        return 2 * num_tokens * num_kv_heads * head_dim * self.bytes_per_element

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> bytes:
        stacked = torch.stack([key.detach(), value.detach()]).to("cpu", self.dtype)
        return stacked.view(torch.uint8).numpy().tobytes()

    def decode(self, payload: memoryview, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = torch.frombuffer(bytearray(payload), dtype=self.dtype).view(2, *shape)
        return stacked[0], stacked[1]

    def tensor_size(self, num_tokens: int, width: int) -> int:
        """T * W * b."""
        return num_tokens * width * self.bytes_per_element

    def encode_tensor(self, x: torch.Tensor) -> bytes:
        return x.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy().tobytes()

    def decode_tensor(self, payload: memoryview, num_tokens: int, width: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(payload), dtype=self.dtype).view(num_tokens, width)


@dataclass(frozen=True)
class Grouping:
    """How one tensor is cut into quantization groups: per token (``group`` channels at a time;
    None = all of a head's channels) or per channel (over all of the frame's tokens)."""

    per_channel: bool = False
    group: int | None = None

    def group_size(self, head_dim: int) -> int:
        """Channels per group of a per-token grouping (the whole head when ``group`` does not divide it)."""
        if self.group is None or head_dim % self.group:
            return head_dim
        return self.group

    def count(self, num_tokens: int, num_kv_heads: int, head_dim: int) -> int:
        """S, the number of (scale, minimum) pairs."""
        if self.per_channel:
            return num_kv_heads * head_dim
        return num_kv_heads * num_tokens * (head_dim // self.group_size(head_dim))

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        """(H, T, D) -> a view whose last axis is one group, in scale order."""
        heads, tokens, head_dim = x.shape
        if self.per_channel:
            return x.transpose(1, 2)  # (H, D, T): one group per (head, channel)
        size = self.group_size(head_dim)
        return x.reshape(heads, tokens, head_dim // size, size)

    def ungroup(self, grouped: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        return grouped.transpose(1, 2) if self.per_channel else grouped.reshape(shape)


@dataclass(frozen=True)
class QuantCodec(KVCodec):
    """Asymmetric min/max integer quantization of K and V with float16 scales (see the module doc)."""

    name: str
    code: int
    bits: int
    keys: Grouping
    values: Grouping

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def _codes_size(self, count: int) -> int:
        return (count * self.bits + 7) // 8  # int4: two per byte, an odd count padded

    def _tensor_size(self, grouping: Grouping, num_tokens: int, num_kv_heads: int, head_dim: int) -> int:
        groups = grouping.count(num_tokens, num_kv_heads, head_dim)
        return SCALE_BYTES * groups + self._codes_size(num_tokens * num_kv_heads * head_dim)

    def payload_size(self, num_tokens: int, num_kv_heads: int, head_dim: int) -> int:
        """Per tensor: 4 * S + ceil(H * T * D * bits / 8); K's S and V's S as in the module doc."""
        return self._tensor_size(self.keys, num_tokens, num_kv_heads, head_dim) + self._tensor_size(
            self.values, num_tokens, num_kv_heads, head_dim
        )

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> bytes:
        return self._encode_one(key, self.keys) + self._encode_one(value, self.values)

    def decode(self, payload: memoryview, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        heads, tokens, head_dim = shape
        split = self._tensor_size(self.keys, tokens, heads, head_dim)
        return self._decode_one(payload[:split], shape, self.keys), self._decode_one(
            payload[split:], shape, self.values
        )

    def tensor_size(self, num_tokens: int, width: int) -> int:
        """As V of one head of ``width`` channels: 4 * S + ceil(T * W * bits / 8)."""
        return self._tensor_size(self.values, num_tokens, 1, width)

    def encode_tensor(self, x: torch.Tensor) -> bytes:
        return self._encode_one(x[None], self.values)

    def decode_tensor(self, payload: memoryview, num_tokens: int, width: int) -> torch.Tensor:
        return self._decode_one(payload, (1, num_tokens, width), self.values)[0]

    # -- one tensor ----------------------------------------------------------------------------
    def _encode_one(self, x: torch.Tensor, grouping: Grouping) -> bytes:
        x = x.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > FLOAT16_MAX:
            raise FedAttnError(
                f"values beyond +-{FLOAT16_MAX:g} (or not finite) cannot be carried by "
                f"{self.name}'s float16 scales; "
                "use a float codec"
            )
        grouped = grouping.groups(x)
        low = grouped.amin(dim=-1, keepdim=True).to(torch.float16)
        # the minimum rounds to float16, possibly above the group's maximum: never a negative scale
        scale = ((grouped.amax(dim=-1, keepdim=True) - low.float()) / self.levels).clamp_min(0).to(torch.float16)
        # quantize against the float16 values the receiver will use, so decoding is exact to them
        step = scale.float()
        safe = torch.where(step > 0, step, torch.ones_like(step))
        codes = torch.where(step > 0, torch.round((grouped - low.float()) / safe), torch.zeros_like(grouped))
        codes = grouping.ungroup(codes.clamp_(0, self.levels), x.shape).to(torch.uint8).reshape(-1)
        return scale.numpy().tobytes() + low.numpy().tobytes() + self._pack(codes)

    def _decode_one(self, payload: memoryview, shape: tuple[int, int, int], grouping: Grouping) -> torch.Tensor:
        heads, tokens, head_dim = shape
        count = grouping.count(tokens, heads, head_dim)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        scale = data[: 2 * count].view(torch.float16).float()
        low = data[2 * count : 4 * count].view(torch.float16).float()
        if not bool(torch.isfinite(scale).all()) or not bool(torch.isfinite(low).all()):
            raise CodecError("non-finite quantization scales")
        if bool((scale < 0).any()):
            raise CodecError("negative quantization scales")
        codes = self._unpack(data[4 * count :], heads * tokens * head_dim).float().view(shape)
        grouped = grouping.groups(codes)
        scale = scale.view(*grouped.shape[:-1], 1)
        low = low.view(*grouped.shape[:-1], 1)
        return grouping.ungroup(low + grouped * scale, shape).contiguous()

    def _pack(self, codes: torch.Tensor) -> bytes:
        if self.bits == 8:
            return codes.numpy().tobytes()
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        pairs = codes.view(-1, 2)
        return (pairs[:, 0] | (pairs[:, 1] << 4)).numpy().tobytes()

    def _unpack(self, data: torch.Tensor, count: int) -> torch.Tensor:
        if self.bits == 8:
            return data
        codes = torch.stack([data & 0x0F, data >> 4], dim=1).reshape(-1)
        if count % 2 and int(codes[count]) != 0:
            raise CodecError("non-zero int4 padding nibble")
        return codes[:count]


PER_TOKEN = Grouping()
PER_CHANNEL = Grouping(per_channel=True)
CODECS: dict[str, KVCodec] = {
    codec.name: codec
    for codec in (
        FloatCodec("float32", 1, torch.float32),
        FloatCodec("bfloat16", 2, torch.bfloat16),
        FloatCodec("float16", 3, torch.float16),
        QuantCodec("int8", 4, 8, PER_TOKEN, PER_TOKEN),
        QuantCodec("int4", 5, 4, PER_TOKEN, PER_TOKEN),
        QuantCodec("int8-kivi", 6, 8, PER_CHANNEL, PER_TOKEN),
        QuantCodec("int4-kivi", 7, 4, PER_CHANNEL, Grouping(group=32)),
    )
}
CODEC_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def get_codec(name: str) -> KVCodec:
    canonical = CODEC_ALIASES.get(name, name)
    if canonical not in CODECS:
        raise FedAttnError(f"unknown KV codec {name!r}: choose one of {', '.join(CODECS)}")
    return CODECS[canonical]


def codec_by_code(code: int) -> KVCodec | None:
    return next((codec for codec in CODECS.values() if codec.code == code), None)
