"""The paper's random sparsification: which tokens a party keeps, and which it sends per block.

Every draw is a pure function of (seed, party, block): a party computes its own samples locally,
the same in one process or many, and the test oracle can ask for the very same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedattn.errors import FedAttnError
from fedattn.runtime.seeding import seeded_generator


@dataclass(frozen=True)
class Sparsity:
    """Keep ratios: ``comp`` for sparse local attention, ``comm`` for sparse KV exchange.

    The ``*_publisher`` ratios apply to the task publisher; None means "same as the collaborators".
    A ratio of 1.0 (the default) draws nothing and changes nothing.
    """

    comp: float = 1.0
    comm: float = 1.0
    comp_publisher: float | None = None
    comm_publisher: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for label, ratio in (
            ("computation", self.comp),
            ("communication", self.comm),
            ("publisher's computation", self.comp_publisher),
            ("publisher's communication", self.comm_publisher),
        ):
            if ratio is not None and not 0.0 < ratio <= 1.0:
                raise FedAttnError(f"the {label} keep ratio must be in (0, 1], got {ratio}")

    def comp_ratio(self, is_publisher: bool) -> float:
        return self.comp_publisher if is_publisher and self.comp_publisher is not None else self.comp

    def comm_ratio(self, is_publisher: bool) -> float:
        return self.comm_publisher if is_publisher and self.comm_publisher is not None else self.comm


def sample_count(total: int, ratio: float) -> int:
    """How many of ``total`` tokens a ratio keeps: round(ratio * total), at least one."""
    return max(1, min(total, round(ratio * total)))


def kept_indices(sparsity: Sparsity, party: int, num_tokens: int, is_publisher: bool) -> torch.Tensor:
    """Indices (into the party's own segment) of the tokens it keeps for the whole run.

    The publisher always keeps its last token: the answer is predicted there.
    """
    ratio = sparsity.comp_ratio(is_publisher)
    if ratio >= 1.0:
        return torch.arange(num_tokens)
    count = sample_count(num_tokens, ratio)
    if is_publisher:
        chosen = _draw(sparsity.seed, "comp", party, -1, num_tokens - 1, count - 1)
        return torch.cat([chosen, torch.tensor([num_tokens - 1])])
    return _draw(sparsity.seed, "comp", party, -1, num_tokens, count)


def sent_indices(sparsity: Sparsity, party: int, layer: int, num_kept: int, is_publisher: bool) -> torch.Tensor:
    """Indices (into the party's kept tokens) whose K/V it sends at ``layer``: a fresh draw per block."""
    ratio = sparsity.comm_ratio(is_publisher)
    if ratio >= 1.0:
        return torch.arange(num_kept)
    return draw_sent(sparsity.seed, party, layer, num_kept, sample_count(num_kept, ratio))


def draw_sent(seed: int, party: int, layer: int, num_kept: int, count: int) -> torch.Tensor:
    """``count`` of ``num_kept`` tokens for the sparse exchange at ``layer``: a fresh draw per block
    (all of them, undrawn, when ``count`` covers them)."""
    if count >= num_kept:
        return torch.arange(num_kept)
    return _draw(seed, "comm", party, layer, num_kept, count)


def _draw(seed: int, purpose: str, party: int, layer: int, population: int, count: int) -> torch.Tensor:
    if population < 0 or count > population:
        raise FedAttnError(f"cannot sample {count} of {population} tokens")
    generator = seeded_generator(seed, purpose, party, layer)
    return torch.randperm(population, generator=generator)[:count].sort().values
