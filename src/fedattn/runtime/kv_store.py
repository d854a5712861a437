"""A participant's own KV store: per block, every key/value it may attend to, with global positions.

At a local block that is the party's own tokens; at a block where it received K/V it also holds
what it received. Attention is order-free given a positional mask, so received and own entries
simply append; buffers grow geometrically so a decode step copies one token, not the whole cache.
"""

from __future__ import annotations

import torch


class LayerKV:
    """Growable (heads, tokens, head_dim) buffers for K and V plus a positions vector."""

    def __init__(self) -> None:
        self._key: torch.Tensor | None = None
        self._value: torch.Tensor | None = None
        self._positions = torch.empty(0, dtype=torch.long)
        self.length = 0
        self.planned_capacity = 0

    def append(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
        """Add entries; ``key``/``value`` are (heads, n, head_dim), ``positions`` (n,)."""
        count = key.shape[1]
        self._reserve(key, self.length + count)
        self._key[:, self.length : self.length + count] = key
        self._value[:, self.length : self.length + count] = value
        self._positions[self.length : self.length + count] = positions
        self.length += count

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, V, positions) of everything stored, as views (no copy)."""
        return self._key[:, : self.length], self._value[:, : self.length], self._positions[: self.length]

    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        capacity = 0 if self._key is None else self._key.shape[1]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 16, self.planned_capacity)
        template = like if self._key is None else self._key  # the first entries fix dtype and device
        heads, _, head_dim = template.shape
        key = template.new_empty(heads, new_capacity, head_dim)
        value = template.new_empty(heads, new_capacity, head_dim)
        positions = torch.empty(new_capacity, dtype=torch.long, device=template.device)
        if self._key is not None:
            key[:, : self.length] = self._key[:, : self.length]
            value[:, : self.length] = self._value[:, : self.length]
            positions[: self.length] = self._positions[: self.length]
        self._key, self._value, self._positions = key, value, positions


class ParticipantKVStore:
    """One ``LayerKV`` per Transformer block."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]

    def reserve(self, tokens: int) -> None:
        """Size the first allocation of every block for ``tokens`` entries (an upper bound known
        before prefill: the whole prompt plus the new tokens), so appends never reallocate."""
        for layer in self.layers:
            layer.planned_capacity = tokens

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]
