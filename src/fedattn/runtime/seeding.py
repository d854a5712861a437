"""The one recipe for seeded random draws.

Every draw (sparse token samples, K/V noise, sampled tokens, the attack's simulated noise) is a
pure function of what it is for, so a party computes it locally, the same in one process or many,
and a test oracle can ask for the very same draw. Hashing the parts keeps draws for different
purposes, parties and blocks independent, which ``seed * k + party`` arithmetic does not.
"""

from __future__ import annotations

import hashlib

import torch


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from the sha256 of ``parts`` joined by ':' (e.g. seed, purpose, party, block)."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
