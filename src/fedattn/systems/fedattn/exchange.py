"""What a party does to the K/V it sends: which tokens (``--kv-select``), how many at most in
bytes (``--kv-budget``), and how much noise (``--kv-noise``).

These are run settings every party must agree on (a handshake field), and the per-frame token
counts they imply are planned before prefill from agreed settings alone (``frame_token_counts``),
so senders, receivers and the cost model all know them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedattn.errors import FedAttnError
from fedattn.network.frames import kv_frame_size
from fedattn.network.kv_codec import KVCodec
from fedattn.systems.fedattn.budget import Frame, fit_budget
from fedattn.systems.fedattn.schedule import Schedule
from fedattn.systems.fedattn.sparsity import Sparsity, sample_count

SELECTIONS = ("random", "key-norm", "attention")


@dataclass(frozen=True)
class Exchange:
    """``select``: random (the paper's seeded draw), key-norm or attention (see ``selection``);
    ``budget``: a cap in bytes on all K/V frames of one query (None: no cap); ``noise``: the
    Gaussian noise's standard deviation as a multiple of each channel's spread (0: off)."""

    select: str = "random"
    budget: int | None = None
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise FedAttnError(f"unknown K/V selection {self.select!r}: choose one of {', '.join(SELECTIONS)}")
        if self.budget is not None and self.budget < 1:
            raise FedAttnError(f"the K/V budget must be a positive number of bytes, got {self.budget}")
        if not math.isfinite(self.noise) or self.noise < 0:
            raise FedAttnError(f"the K/V noise must be a finite number >= 0, got {self.noise}")


def kept_counts(sparsity: Sparsity, segment_lengths: list[int]) -> list[int]:
    """Tokens each party keeps for the whole run (``--ratio-comp``)."""
    publisher = len(segment_lengths) - 1
    return [sample_count(t, sparsity.comp_ratio(n == publisher)) for n, t in enumerate(segment_lengths)]


def frame_token_counts(
    schedule: Schedule,
    sparsity: Sparsity,
    exchange: Exchange,
    codec: KVCodec,
    segment_lengths: list[int],
    num_kv_heads: int,
    head_dim: int,
    all_answers: bool,
) -> dict[tuple[int, int], int]:
    """(sender, block) -> tokens sent, for every K/V frame of the run: ``--ratio-comm`` of the
    kept tokens, then cut to ``--kv-budget`` (``budget.fit_budget``)."""
    count = len(segment_lengths)
    publisher = count - 1
    kept = kept_counts(sparsity, segment_lengths)
    frames = [
        Frame(
            (sender, layer),
            sample_count(kept[sender], sparsity.comm_ratio(sender == publisher)),
            segment_lengths[sender],
        )
        for layer in range(schedule.num_layers)
        for sender in range(count)
        if schedule.receivers(layer, sender, count, all_answers)
    ]
    if exchange.budget is None:
        return {frame.key: frame.wanted for frame in frames}

    def size(tokens: int, whole: bool) -> int:
        return kv_frame_size(tokens, whole, codec, num_kv_heads, head_dim)

    return fit_budget(frames, exchange.budget, size)
