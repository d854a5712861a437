"""Defenses applied by a sender to its K/V before they go on the wire.

``add_kv_noise`` is THE definition of ``--kv-noise``: the engine (sender side) and ``fedattn
attack`` (which simulates what a receiver gets) call this one function, so a measured leakage
figure and a run's accuracy figure refer to the same noise.
"""

from __future__ import annotations

import torch

from fedattn.errors import FedAttnError
from fedattn.runtime.seeding import seeded_generator


def add_kv_noise(
    key: torch.Tensor, value: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V plus Gaussian noise of standard deviation ``sigma`` times each channel's spread.

    ``key`` and ``value`` are (heads, tokens, head_dim) (any leading dims work): one frame, the
    tokens a party sends at one block. A channel's spread is its standard deviation over those
    tokens (per head and channel, population std), so the noise is scaled to what the channel
    carries: a relative, unit-free ``sigma`` means the same at every block although K/V scales
    differ by block and head. A frame of one token has no spread and gets no noise. The noise is
    drawn in float32 on the generator's device and the result keeps the inputs' dtype and device;
    ``sigma`` == 0 returns the inputs unchanged (no draw, so the generator does not advance).
    """
    if not sigma >= 0:  # also refuses NaN
        raise FedAttnError(f"the K/V noise sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return key, value
    return _noisy(key, sigma, generator), _noisy(value, sigma, generator)


def _noisy(tensor: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    exact = tensor.float()
    spread = exact.std(dim=-2, keepdim=True, correction=0)
    device = generator.device if generator is not None else exact.device
    noise = torch.randn(exact.shape, generator=generator, device=device, dtype=torch.float32).to(exact.device)
    noisy = (exact + sigma * spread * noise).to(tensor.dtype)
    if not torch.isfinite(noisy).all():  # the receiver would refuse the frame as corrupt
        raise FedAttnError(f"K/V noise of sigma {sigma:g} overflows {tensor.dtype}: the noisy K/V are not finite")
    return noisy


def noise_generator(seed: int, party: int, layer: int) -> torch.Generator:
    """The sender's draw for one frame: a pure function of (seed, party, block), so a run is
    reproducible in one process or many."""
    return seeded_generator(seed, "noise", party, layer)
