"""``--kv-noise SIGMA``: Gaussian noise on the K/V a party sends (never on its own store).

The noise of each (head, channel) has standard deviation SIGMA times that channel's spread: the
population standard deviation over the tokens in the frame (so a one-token frame gets none).
Scaling by the spread makes one SIGMA mean the same at every block, whose K/V scales differ by
orders of magnitude. The draw is a pure function of (seed, party, block): a run is reproducible
in one process or many.
"""

from __future__ import annotations

import hashlib

import torch


def noise_generator(seed: int, party: int, layer: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:noise:{party}:{layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def add_noise(
    key: torch.Tensor, value: torch.Tensor, sigma: float, seed: int, party: int, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """New float32 tensors K + noise, V + noise for K/V of shape (heads, tokens, head_dim)."""
    generator = noise_generator(seed, party, layer)
    noisy = []
    for tensor in (key, value):
        x = tensor.detach().float()
        spread = x.std(dim=1, keepdim=True, correction=0)
        draw = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        noisy.append(x + sigma * spread * draw)
    return noisy[0], noisy[1]
