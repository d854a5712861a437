from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseRow:
    """One position of one worker's distribution as it is sent: the kept ids and their probabilities."""

    ids: torch.Tensor  # (k,) int64, distinct, in [0, vocab)
    probs: torch.Tensor  # (k,) float32
    residual: float  # eps = 1 - sum of the true kept probabilities, in [0, 1]
