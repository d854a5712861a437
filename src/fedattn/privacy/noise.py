"""Defenses applied by a sender to what it puts on the wire: K/V (FedAttn) or hidden states (split).

``add_kv_noise`` is THE definition of ``--kv-noise`` and ``add_hidden_noise`` of ``fedattn split
--noise``: the sender and the attacks (which simulate what a receiver gets) call these functions,
so a measured leakage figure and a run's accuracy figure refer to the same noise.
"""

from __future__ import annotations

import math

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


MEAN_ABS_TO_SIGMA = math.sqrt(math.pi / 2)  # E|N(0, s^2)| = s * sqrt(2 / pi)


def hidden_noise_sigma(hidden: torch.Tensor, level: float, relative: bool) -> float:
    """The standard deviation whose mean absolute draw is ``level`` (FedSEA's knob), or, when
    ``relative``, ``level`` times the mean |h| of this very tensor: the scale of hidden states
    differs between models and depths, so a relative level means the same everywhere."""
    if not level >= 0:  # also refuses NaN
        raise FedAttnError(f"the hidden-state noise level must be >= 0, got {level}")
    scale = float(hidden.float().abs().mean()) if relative else 1.0
    return level * scale * MEAN_ABS_TO_SIGMA


def add_hidden_noise(
    hidden: torch.Tensor, level: float, relative: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``hidden`` plus elementwise Gaussian noise of mean absolute value ``level`` (or ``level``
    times mean |hidden|, when ``relative``); THE definition of ``fedattn split --noise`` for the
    client and for the attacks that simulate what the server receives. Level 0 returns ``hidden``
    itself (no draw). The draw is float32 on the CPU generator; the result keeps ``hidden``'s dtype."""
    sigma = hidden_noise_sigma(hidden, level, relative)
    if sigma == 0:
        return hidden
    noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32).to(hidden.device)
    noisy = (hidden.float() + sigma * noise).to(hidden.dtype)
    if not torch.isfinite(noisy).all():
        raise FedAttnError(f"hidden-state noise of sigma {sigma:g} overflows {hidden.dtype}")
    return noisy
