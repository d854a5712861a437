"""SpecFed's arithmetic: distributions, top-K compression and its reconstruction, the weighted ensemble,
and the speculative acceptance rule (../shared/spec/specfed.md, "The federated model", "One round").

Pure functions of tensors, with no model and no party, so that the in-process and the networked runs, and
the tests, share one definition of every step. Probabilities travel and are returned as float32 (what a
worker sends); sums that decide something (a residual mass, a scale, an acceptance ratio, a weighted
ensemble) are taken in float64 so that float32 rounding cannot change a kept mass or a verdict, and a
lossless row reconstructs bit for bit.

Sampling draws, in this order and from the caller's generator only: one ``torch.rand`` float64 uniform per
examined draft, then one ``torch.multinomial`` over a float64 CPU copy of the distribution to sample from.
A networked run seeded like an in-process one therefore emits the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedattn.errors import FedAttnError

RECONSTRUCTIONS = ("renormalize", "redistribute")

WEIGHT_SUM_TOLERANCE = 1e-6
# A rejection's residual max(0, p - q) with less total mass than this is float noise (p == q up to rounding):
# the replacement is then sampled from p. The rejection itself happens with probability sum max(0, q - p), which
# equals that mass, so this changes the output distribution by at most this much in total variation.
RESIDUAL_FLOOR = 1e-6


@dataclass(frozen=True)
class SparseRow:
    """One position of one worker's distribution as it is sent: the kept ids and their probabilities."""

    ids: torch.Tensor  # (k,) int64, distinct, in [0, vocab); in descending probability order when made by top_k
    probs: torch.Tensor  # (k,) float32, the worker's probabilities of those ids (may be lossy after a codec)
    residual: float  # eps = the mass not kept, 1 - sum of the true kept probabilities, clamped to [0, 1]

    def __post_init__(self) -> None:
        """A row that exists is well formed; only the vocabulary bound waits for ``reconstruct``."""
        if self.ids.dim() != 1 or self.probs.dim() != 1 or self.ids.numel() != self.probs.numel():
            raise FedAttnError(
                f"a sparse row needs ids and probs of one length, got shapes {tuple(self.ids.shape)} "
                f"and {tuple(self.probs.shape)}"
            )
        if self.ids.numel() < 1:
            raise FedAttnError("a sparse row must keep at least one token")
        if self.ids.dtype != torch.int64 or self.probs.dtype != torch.float32:
            raise FedAttnError(
                f"a sparse row needs int64 ids and float32 probs, got {self.ids.dtype} and {self.probs.dtype}"
            )
        if not bool(torch.isfinite(self.probs).all()) or bool((self.probs < 0).any()):
            raise FedAttnError("a sparse row's probabilities must be finite and >= 0")
        if not 0.0 <= self.residual <= 1.0:  # NaN fails too
            raise FedAttnError(f"a sparse row's residual mass must be in [0, 1], got {self.residual}")
        if torch.unique(self.ids).numel() != self.ids.numel():
            raise FedAttnError("a sparse row's ids must be distinct")

    @property
    def k(self) -> int:
        return self.ids.numel()


def distributions(logits: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
    """(P, rows) logits -> (P, vocab) float32 probabilities softmax(z / T) over the real vocabulary.

    Columns >= vocab are embedding padding rows: dropped before the softmax, so they take no mass. Greedy
    (temperature 0) takes the argmax of the ensemble p, which needs the distributions at temperature 1.
    """
    if logits.dim() != 2:
        raise FedAttnError(f"logits must be (positions, rows), got shape {tuple(logits.shape)}")
    if not 1 <= vocab <= logits.shape[1]:
        raise FedAttnError(f"the vocabulary size must be in [1, {logits.shape[1]}] (the logits' rows), got {vocab}")
    if not 0 <= temperature < math.inf:  # NaN fails too
        raise FedAttnError(f"the temperature must be a finite number >= 0, got {temperature}")
    scale = temperature if temperature > 0 else 1.0
    return torch.softmax(logits[:, :vocab].float() / scale, dim=-1)


def top_k(p: torch.Tensor, k: int | None) -> SparseRow:
    """The k most probable tokens of p (vocab,), highest first; k None keeps every token in id order."""
    vocab = _check_distribution(p)
    if k is None:
        return _kept(p, torch.arange(vocab))
    if not 1 <= k <= vocab:
        raise FedAttnError(f"top-K must be in [1, {vocab}] (the vocabulary), got {k}")
    return _kept(p, torch.topk(p, k).indices.cpu())


def adaptive_top_k(p: torch.Tensor, eps_target: float, cap: int) -> SparseRow:
    """The fewest tokens (highest first) whose mass reaches 1 - eps_target, at most cap, at least 1.

    The running mass is summed in float64; when float32 rounding keeps it below 1 - eps_target to the last
    token, every token is kept (then capped).
    """
    vocab = _check_distribution(p)
    if not 0.0 <= eps_target < 1.0:  # NaN fails too
        raise FedAttnError(f"the residual-mass target must be in [0, 1), got {eps_target}")
    if cap < 1:
        raise FedAttnError(f"the cap on kept tokens must be >= 1, got {cap}")
    ordered, order = torch.sort(p.detach().cpu().double(), descending=True, stable=True)
    reached = torch.searchsorted(ordered.cumsum(0), torch.tensor([1.0 - eps_target], dtype=torch.float64))
    count = min(int(reached) + 1, vocab, cap)
    return _kept(p, order[:count])


def reconstruct(row: SparseRow, vocab: int, mode: str) -> torch.Tensor:
    """The server's (vocab,) float32 estimate of a worker's distribution from one sparse row.

    renormalize: probs / sum(probs) on the kept ids, 0 elsewhere (L1 error exactly 2 eps).
    redistribute: the kept probs scaled to total 1 - residual (the identity for a lossless codec; it corrects a
    lossy one) and residual / (vocab - k) on every other id (L1 error at most 2 eps); with k == vocab there is
    no other id and the kept probs are scaled to total 1.
    """
    if mode not in RECONSTRUCTIONS:
        raise FedAttnError(f"unknown reconstruction {mode!r}: choose one of {', '.join(RECONSTRUCTIONS)}")
    if row.k > vocab:
        raise FedAttnError(f"a sparse row keeps {row.k} tokens, more than the vocabulary's {vocab}")
    if int(row.ids.min()) < 0 or int(row.ids.max()) >= vocab:
        raise FedAttnError(f"a sparse row's ids must be in [0, {vocab})")
    kept = row.probs.detach().cpu().double()
    kept_mass = float(kept.sum())
    if kept_mass <= 0.0:
        raise FedAttnError("a sparse row's kept probabilities total 0")
    estimate = torch.zeros(vocab, dtype=torch.float64)
    if mode == "renormalize" or row.k == vocab:
        estimate[row.ids.cpu()] = kept / kept_mass
    else:
        estimate.fill_(row.residual / (vocab - row.k))
        estimate[row.ids.cpu()] = kept * ((1.0 - row.residual) / kept_mass)
    return estimate.float()


def aggregate(dists: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The ensemble sum_i w_i dists[i] (any one shape for all), summed in float64, returned as float32."""
    if len(dists) != len(weights) or not dists:
        raise FedAttnError(f"the ensemble needs one weight per distribution, got {len(dists)} and {len(weights)}")
    if not all(0.0 < weight < math.inf for weight in weights):
        raise FedAttnError(f"the ensemble weights must be finite and > 0, got {list(weights)}")
    if abs(math.fsum(weights) - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise FedAttnError(f"the ensemble weights must sum to 1, got {math.fsum(weights)}")
    shape = dists[0].shape
    if any(dist.shape != shape for dist in dists):
        raise FedAttnError(f"the ensemble's distributions differ in shape: {[tuple(dist.shape) for dist in dists]}")
    total = torch.zeros(shape, dtype=torch.float64, device=dists[0].device)
    for dist, weight in zip(dists, weights):
        total += weight * dist.double()
    return total.float()


def accept_greedy(drafts: Sequence[int], p: torch.Tensor) -> tuple[int, int]:
    """(accepted count n, next token): the longest prefix with drafts[j] == argmax p[j], then argmax p[n].

    p: (len(drafts) + 1, vocab), the aggregated distributions; ties go to the lowest id (torch.argmax).
    """
    _check_rounds(drafts, p)
    best = torch.argmax(p, dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == best[accepted]:
        accepted += 1
    return accepted, best[accepted]


def accept_sampled(
    drafts: Sequence[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator
) -> tuple[int, int]:
    """(accepted count n, next token) by speculative sampling; the emitted tokens are distributed as p.

    q: (len(drafts), vocab), the draft's distributions the drafts were sampled from; p: (len(drafts) + 1, vocab).
    For each draft in order, one float64 uniform r in [0, 1) from ``generator``; draft x_j is accepted iff
    r < p[j, x_j] / q[j, x_j] (strict, so a token p gives 0 is never accepted, even at r == 0; the acceptance
    probability is min(1, p/q) all the same). At the first rejection the next token is sampled from
    normalize(max(0, p[j] - q[j])) (from p[j] when that residual is float noise, below RESIDUAL_FLOOR);
    when all are accepted, the bonus token is sampled from p[len(drafts)]. With no drafts this samples p[0].
    """
    vocab = _check_rounds(drafts, p)
    if q.dim() != 2 or q.shape != (len(drafts), vocab):
        raise FedAttnError(f"the draft distributions must be ({len(drafts)}, {vocab}), got {tuple(q.shape)}")
    for position, draft in enumerate(drafts):
        drafted = float(q[position, draft])
        if not drafted > 0.0:
            raise FedAttnError(
                f"draft {draft} at position {position} has probability 0 under q, it was not sampled from q"
            )
        uniform = float(torch.rand((), generator=generator, dtype=torch.float64))
        if not uniform < float(p[position, draft]) / drafted:
            residual = (p[position].double() - q[position].double()).clamp_min(0.0)
            replacement = residual if float(residual.sum()) >= RESIDUAL_FLOOR else p[position]
            return position, sample(replacement, generator)
    return len(drafts), sample(p[len(drafts)], generator)


def sample(p: torch.Tensor, generator: torch.Generator | None) -> int:
    """A token from the (vocab,) weights p: their argmax when generator is None, else one draw of
    ``torch.multinomial`` over a float64 CPU copy (so the draw does not depend on where p lives)."""
    if p.dim() != 1:
        raise FedAttnError(f"a distribution to sample must be (vocab,), got shape {tuple(p.shape)}")
    if generator is None:
        return int(torch.argmax(p))
    return int(torch.multinomial(p.detach().to("cpu", torch.float64), 1, generator=generator))


def overlap(p: torch.Tensor, q: torch.Tensor) -> float:
    """beta = sum_x min(p(x), q(x)) (float64 sum): the expected acceptance rate of drafts from q against p."""
    _check_same_shape(p, q)
    if p.dim() != 1:
        raise FedAttnError(f"the overlap takes two (vocab,) distributions, got shape {tuple(p.shape)}")
    return float(torch.minimum(p.double(), q.double()).sum())


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum |a - b| over all elements (float64 sum)."""
    _check_same_shape(a, b)
    return float((a.double() - b.double()).abs().sum())


def _kept(p: torch.Tensor, ids: torch.Tensor) -> SparseRow:
    """The row of p that keeps ``ids``; its residual is 1 - their float64 mass, clamped to [0, 1]."""
    probs = p.detach()[ids.to(p.device)].cpu().float()
    residual = min(1.0, max(0.0, 1.0 - float(probs.double().sum())))
    return SparseRow(ids=ids.to(torch.int64), probs=probs, residual=residual)


def _check_distribution(p: torch.Tensor) -> int:
    """The vocabulary size of a (vocab,) distribution."""
    if p.dim() != 1 or p.numel() < 1 or not p.is_floating_point():
        raise FedAttnError(f"a distribution must be a non-empty float (vocab,) tensor, got {p.dtype} {tuple(p.shape)}")
    return p.numel()


def _check_rounds(drafts: Sequence[int], p: torch.Tensor) -> int:
    """The vocabulary size of a round's aggregated p (len(drafts) + 1, vocab), after checking the drafts' ids."""
    if p.dim() != 2 or p.shape[0] != len(drafts) + 1:
        raise FedAttnError(f"p must be ({len(drafts) + 1}, vocab) for {len(drafts)} drafts, got {tuple(p.shape)}")
    vocab = p.shape[1]
    if any(not 0 <= draft < vocab for draft in drafts):
        raise FedAttnError(f"draft ids must be in [0, {vocab}), got {list(drafts)}")
    return vocab


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise FedAttnError(f"the two distributions differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
