"""How K/V tensors become payload bytes and back (the dtype on the wire).

A codec is chosen once per run and agreed by all parties; the wire layer names it in each frame's
header so a receiver can refuse anything else. Later codecs (quantized ones) plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FedAttnError


@dataclass(frozen=True)
class KVCodec:
    """A plain floating-point codec: K and V cast to ``dtype``, little-endian, row-major."""

    name: str
    code: int
    dtype: torch.dtype

    @property
    def bytes_per_element(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def payload_size(self, num_tokens: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of K and V together for ``num_tokens`` tokens."""
        return 2 * num_tokens * num_kv_heads * head_dim * self.bytes_per_element

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> bytes:
        """K and V of shape (heads, tokens, head_dim) -> bytes (K first, then V)."""
        stacked = torch.stack([key.detach(), value.detach()]).to("cpu", self.dtype)
        return stacked.view(torch.uint8).numpy().tobytes()

    def decode(self, payload: memoryview, shape: tuple[int, int, int]) -> torch.Tensor:
        """bytes -> a (2, heads, tokens, head_dim) tensor of K and V; the caller checked the length."""
        return torch.frombuffer(bytearray(payload), dtype=self.dtype).view(2, *shape)


CODECS: dict[str, KVCodec] = {
    codec.name: codec
    for codec in (
        KVCodec("float32", 1, torch.float32),
        KVCodec("bfloat16", 2, torch.bfloat16),
        KVCodec("float16", 3, torch.float16),
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
