"""SpecFed's kernel against independent references (../shared/spec/specfed.md, "What must hold").

Speculative sampling is checked by Monte Carlo against the distributions it must reproduce (and each
test shows that the tempting wrong residual rule would fail it); the compression bounds against float64
numpy sums over many random distributions; greedy acceptance against hand-built rounds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedattn.errors import FedAttnError
from fedattn.systems.specfed.kernel import (
    RECONSTRUCTIONS,
    SparseRow,
    accept_greedy,
    accept_sampled,
    adaptive_top_k,
    aggregate,
    distributions,
    l1,
    overlap,
    reconstruct,
    sample,
    top_k,
)

# p and q over six tokens, deliberately far apart: q favours what p does not.
P_FAR = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
Q_FAR = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.20, 0.30])


def _frequencies(tokens: list[int], vocab: int) -> np.ndarray:
    return np.bincount(np.asarray(tokens), minlength=vocab) / len(tokens)


def _draws(q_row: torch.Tensor, count: int, seed: int) -> list[int]:
    """``count`` independent draft tokens from q_row, drawn by the test (not by the kernel)."""
    return torch.multinomial(q_row, count, replacement=True, generator=torch.Generator().manual_seed(seed)).tolist()


def _first_token_with_wrong_replacement(p: np.ndarray, q: np.ndarray, replacement: np.ndarray) -> np.ndarray:
    """The first token's law when a rejection samples ``replacement`` instead of normalize(max(0, p - q)):
    draft x is accepted with probability q(x) min(1, p(x)/q(x)) = min(p(x), q(x)); else (1 - beta) goes to it."""
    accepted = np.minimum(p, q)
    return accepted + (1.0 - accepted.sum()) * replacement


@pytest.mark.usefixtures("one_torch_thread")
def test_one_draft_emits_p_where_a_wrong_residual_rule_would_not():
    draws, tolerance = 30_000, 0.03  # empirical L1 noise here is about 0.01 (sum_x sqrt(2 p(1-p) / (pi N)))
    p, q = P_FAR.double().numpy(), Q_FAR.double().numpy()
    for wrong in (p, q):  # the replacement drawn from p, or from q: both far from p, so this test can fail
        assert np.abs(_first_token_with_wrong_replacement(p, q, wrong) - p).sum() > 4 * tolerance
    rounds = torch.stack([P_FAR, P_FAR])  # the ensemble's p at the draft's position and at the bonus position
    generator = torch.Generator().manual_seed(1)
    drafts = _draws(Q_FAR, draws, 2)
    outcomes = [accept_sampled([draft], Q_FAR[None], rounds, generator) for draft in drafts]
    first = [draft if count else token for draft, (count, token) in zip(drafts, outcomes)]
    assert np.abs(_frequencies(first, 6) - p).sum() < tolerance


@pytest.mark.usefixtures("one_torch_thread")
def test_accepted_drafts_follow_the_overlap_law():
    """i.i.d. positions: P(n accepted) = beta^n (1 - beta) for n < gamma and beta^gamma for n = gamma."""
    gamma, draws, tolerance = 3, 20_000, 0.015  # each frequency's standard deviation is below 0.0036
    p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10])
    q = torch.tensor([0.10, 0.30, 0.30, 0.10, 0.20])
    beta = float(np.minimum(p.numpy(), q.numpy()).sum())
    expected = [beta**n * (1 - beta) for n in range(gamma)] + [beta**gamma]
    generator = torch.Generator().manual_seed(3)
    drafts = torch.tensor([_draws(q, draws, seed) for seed in range(gamma)]).T.tolist()
    outcomes = [accept_sampled(row, q.expand(gamma, -1), p.expand(gamma + 1, -1), generator) for row in drafts]
    accepted = _frequencies([count for count, _ in outcomes], gamma + 1)
    assert np.abs(accepted - np.array(expected)).max() < tolerance
    first = [row[0] if count > 0 else token for row, (count, token) in zip(drafts, outcomes)]
    assert np.abs(_frequencies(first, 5) - p.numpy()).sum() < 0.03


@pytest.mark.usefixtures("one_torch_thread")
def test_a_stream_of_rounds_emits_independent_tokens_of_each_positions_p():
    """Position-dependent p and q (each independent of the prefix), gamma = 2, rounds until two tokens are out:
    the pair must be distributed as p[0] x p[1], whichever round each token came from."""
    gamma, streams, tolerance = 2, 20_000, 0.06  # 16 cells: empirical L1 noise about 0.02
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.3, 0.3, 0.3, 0.1], [0.1, 0.2, 0.3, 0.4]])
    # drafts[start][j]: the round that starts at position ``start`` drafts its j-th token from q[start + j]
    drafts = [[_draws(q[start + j], streams, 10 * start + j) for j in range(gamma)] for start in range(2)]
    generator = torch.Generator().manual_seed(5)
    pairs = np.zeros((4, 4))
    for stream in range(streams):
        tokens: list[int] = []
        while len(tokens) < 2:
            start = len(tokens)
            round_drafts = [drafts[start][j][stream] for j in range(gamma)]
            count, token = accept_sampled(
                round_drafts, q[start : start + gamma], p[start : start + gamma + 1], generator
            )
            tokens += round_drafts[:count] + [token]
        pairs[tokens[0], tokens[1]] += 1 / streams
    independent = np.outer(p[0].numpy(), p[1].numpy())
    assert np.abs(pairs - independent).sum() < tolerance
    # an off-by-one (the second token drawn from the first position's p) would be far outside the tolerance
    assert np.abs(np.outer(p[0].numpy(), p[0].numpy()) - independent).sum() > 10 * tolerance


def test_draws_follow_the_documented_order():
    """One float64 uniform per examined draft, then one multinomial over a float64 copy: a networked run
    seeded alike must make the same token and leave the generator in the same state."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.2, 0.3, 0.5]])  # p/q >= 1 at token 1 (0.3/0.3): the draft is always accepted
    for seed in range(20):
        generator, replay = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert accept_sampled([1], q, p, generator) == (1, int(_replayed(replay, p[1], uniforms=1)))
        assert torch.equal(generator.get_state(), replay.get_state())
        generator, replay = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert accept_sampled([], q[:0], p[:1], generator) == (0, int(_replayed(replay, p[0], uniforms=0)))
        assert sample(p[0], _seeded(seed)) == accept_sampled([], q[:0], p[:1], _seeded(seed))[1]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _replayed(generator: torch.Generator, weights: torch.Tensor, uniforms: int) -> torch.Tensor:
    for _ in range(uniforms):
        torch.rand((), generator=generator, dtype=torch.float64)
    return torch.multinomial(weights.double(), 1, generator=generator)


def test_a_rejection_where_p_equals_q_samples_p():
    """p == q up to float error: the residual max(0, p - q) is noise, so a rejection (forced here by a draft
    with p = 0 under a q that floats above it by 1e-9 elsewhere) must fall back to p, never to the noise."""
    p = torch.tensor([[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    q = torch.tensor([[1e-9, 0.5 - 1e-9, 0.5]], dtype=torch.float64)
    tokens = {accept_sampled([0], q, p, _seeded(seed)) for seed in range(200)}
    assert {count for count, _ in tokens} == {0}  # p(0) = 0: never accepted
    assert {token for _, token in tokens} == {1, 2}  # p[0]'s support; the noise sits at token 1 only


def test_greedy_accepts_the_longest_matching_prefix():
    vocab = 5
    argmaxes = [2, 4, 1, 3]
    p = torch.full((4, vocab), 0.1)
    for position, token in enumerate(argmaxes):
        p[position, token] = 0.6
    assert accept_greedy([2, 4, 1], p) == (3, 3)  # all accepted: the bonus position's argmax
    assert accept_greedy([2, 0, 1], p) == (1, 4)  # first mismatch at 1: that position's argmax
    assert accept_greedy([3, 4, 1], p) == (0, 2)
    assert accept_greedy([2, 4, 0], p) == (2, 1)
    assert accept_greedy([], p[:1]) == (0, 2)  # no drafts: plain greedy ensemble decoding
    tied = torch.tensor([[0.1, 0.4, 0.4, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert accept_greedy([2], tied) == (0, 1)  # ties go to the lowest id
    assert accept_greedy([1], tied) == (1, 0)
    assert sample(p[1], None) == 4


def _random_distributions(rng: np.random.Generator, vocab: int) -> list[np.ndarray]:
    """Flat to peaked: Dirichlet at several concentrations and softmaxes of Gaussian logits at several scales,
    as float32 values (what a worker holds), returned in float64 for the references."""
    shapes = [rng.dirichlet(np.full(vocab, alpha)) for alpha in (0.01, 0.1, 1.0, 10.0, 100.0) for _ in range(3)]
    for scale in (1.0, 4.0, 12.0):
        for _ in range(3):
            logits = rng.normal(0.0, scale, vocab)
            shapes.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
    return [shape.astype(np.float32).astype(np.float64) for shape in shapes]


def _kept_mass(p: np.ndarray, k: int) -> float:
    return float(np.sort(p)[::-1][:k].sum())


@pytest.mark.parametrize("k", [1, 5, 50, 499])
def test_reconstruction_errors_are_bounded_by_twice_the_residual(k):
    vocab = 500
    for p in _random_distributions(np.random.default_rng(k), vocab):
        eps = 1.0 - _kept_mass(p, k)
        row = top_k(torch.from_numpy(p).float(), k)
        renormalized = reconstruct(row, vocab, "renormalize").double().numpy()
        redistributed = reconstruct(row, vocab, "redistribute").double().numpy()
        assert abs(np.abs(renormalized - p).sum() - 2 * eps) < 1e-5
        assert np.abs(redistributed - p).sum() <= 2 * eps + 1e-6
        # per worker this is a theorem: sum over dropped x of |p(x) - eps/(V-K)| <= sum p(x) + eps = 2 eps
        assert np.abs(redistributed - p).sum() <= np.abs(renormalized - p).sum() + 1e-6
        assert abs(renormalized.sum() - 1) < 1e-6 and abs(redistributed.sum() - 1) < 1e-6


def test_aggregation_bias_and_acceptance_change_are_bounded():
    vocab, rng = 500, np.random.default_rng(7)
    pool = _random_distributions(rng, vocab)
    redistribute_smaller, trials = 0, 120
    for _ in range(trials):
        workers = int(rng.integers(2, 4))
        dists = [pool[int(index)] for index in rng.choice(len(pool), workers, replace=False)]
        weights = [float(weight) for weight in rng.dirichlet(np.ones(workers))]
        ks = [int(k) for k in rng.choice([1, 5, 50, 499], workers)]
        q = pool[int(rng.integers(len(pool)))]
        p = sum(weight * dist for weight, dist in zip(weights, dists))
        weighted_eps = sum(weight * (1.0 - _kept_mass(dist, k)) for weight, dist, k in zip(weights, dists, ks))
        rows = [top_k(torch.from_numpy(dist).float(), k) for dist, k in zip(dists, ks)]
        bias = {}
        for mode in RECONSTRUCTIONS:
            p_hat = aggregate([reconstruct(row, vocab, mode) for row in rows], weights).double().numpy()
            bias[mode] = np.abs(p_hat - p).sum()
            assert bias[mode] <= 2 * weighted_eps + 1e-6
            assert abs(np.minimum(p_hat, q).sum() - np.minimum(p, q).sum()) <= weighted_eps + 1e-6
        redistribute_smaller += bias["redistribute"] < bias["renormalize"] - 1e-9
    # Not a theorem across workers (renormalize's errors can cancel between workers), so only recorded:
    # observed 118 of 120 trials smaller with redistribute (seed 7, these shapes), the other 2 equal within 2e-8.
    print(f"redistribute's aggregation bias smaller in {redistribute_smaller}/{trials} trials")
    assert redistribute_smaller > 0


def test_lossy_probabilities_are_corrected_by_redistribute():
    """A codec that rounds the kept probabilities (float16 here): redistribute scales them back to 1 - eps."""
    p = torch.softmax(torch.randn(300, generator=_seeded(11)) * 3, dim=-1)
    exact = top_k(p, 20)
    lossy = SparseRow(ids=exact.ids, probs=exact.probs.half().float(), residual=exact.residual)
    assert not torch.equal(lossy.probs, exact.probs)
    redistributed = reconstruct(lossy, 300, "redistribute").double()
    assert abs(float(redistributed[exact.ids].sum()) - (1 - exact.residual)) < 1e-6
    assert abs(float(redistributed.sum()) - 1) < 1e-6
    assert abs(float(reconstruct(lossy, 300, "renormalize").double().sum()) - 1) < 1e-6


def test_a_lossless_row_redistributes_its_kept_probabilities_bit_for_bit():
    p = torch.softmax(torch.randn(500, generator=_seeded(12)) * 2, dim=-1)
    for k in (1, 7, 250, 499):
        row = top_k(p, k)
        assert torch.equal(row.probs, torch.sort(p, descending=True).values[:k])
        assert torch.equal(reconstruct(row, 500, "redistribute")[row.ids], p[row.ids])


@pytest.mark.parametrize("eps_target", [0.0, 0.01, 0.1, 0.5, 0.9, 0.999])
def test_adaptive_top_k_keeps_the_fewest_tokens_reaching_the_target(eps_target):
    vocab = 500
    for p in _random_distributions(np.random.default_rng(21), vocab):
        ordered = sorted(p.tolist(), reverse=True)
        fewest, running = vocab, 0.0
        for count, value in enumerate(ordered, start=1):
            running += value
            if running >= 1.0 - eps_target:
                fewest = count
                break
        for cap in (1, 10, vocab):
            row = adaptive_top_k(torch.from_numpy(p).float(), eps_target, cap)
            assert row.k == max(1, min(fewest, cap))
            kept = p[row.ids.numpy()]
            dropped = np.delete(p, row.ids.numpy())
            assert dropped.size == 0 or kept.min() >= dropped.max()  # the highest tokens
            if fewest <= cap and fewest < vocab:
                assert kept.sum() >= 1.0 - eps_target - 1e-12


def test_distributions_drop_padding_and_scale_by_temperature():
    vocab = 7
    logits = torch.randn(3, 10, generator=_seeded(31)) * 3
    spiked = logits.clone()
    spiked[:, vocab:] = 1e4  # padding rows: must take no mass
    real = logits[:, :vocab].double().numpy()
    for temperature in (0.5, 1.0, 2.0):
        scaled = np.exp((real - real.max(axis=1, keepdims=True)) / temperature)
        reference = scaled / scaled.sum(axis=1, keepdims=True)
        got = distributions(spiked, vocab, temperature)
        assert got.shape == (3, vocab) and got.dtype == torch.float32
        assert np.abs(got.double().numpy() - reference).max() < 1e-6
        assert torch.equal(got, distributions(logits, vocab, temperature))
    assert torch.equal(distributions(spiked, vocab, 0.0), distributions(spiked, vocab, 1.0))


def test_keeping_every_token_reconstructs_p_exactly():
    p = torch.tensor([20.0, 12, 10, 8, 6, 4, 3, 1]) / 64  # dyadic: sums to exactly 1 in float32
    everything = top_k(p, None)
    assert torch.equal(everything.ids, torch.arange(8)) and torch.equal(everything.probs, p)
    assert everything.residual == 0.0
    shuffled = p[torch.tensor([3, 1, 7, 0, 5, 2, 6, 4])]
    assert top_k(shuffled, 8).ids.tolist() == [3, 1, 5, 0, 7, 4, 6, 2]  # k == vocab: by rank, not by id
    for dist in (p, shuffled):
        for row in (top_k(dist, None), top_k(dist, 8)):
            for mode in RECONSTRUCTIONS:
                assert torch.equal(reconstruct(row, 8, mode), dist)
    softmaxed = torch.softmax(torch.randn(500, generator=_seeded(41)), dim=-1)  # sums to 1 within float32 rounding
    for mode in RECONSTRUCTIONS:
        assert torch.allclose(reconstruct(top_k(softmaxed, None), 500, mode), softmaxed, rtol=1e-6, atol=0)


def test_overlap_and_l1_match_hand_computed_values():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    assert overlap(p, q) == 0.5 and overlap(p, p) == 1.0
    assert l1(p, q) == 1.0 and l1(p, p) == 0.0
    a = torch.rand(2, 9, generator=_seeded(51))
    b = torch.rand(2, 9, generator=_seeded(52))
    assert math.isclose(l1(a, b), float(np.abs(a.double().numpy() - b.double().numpy()).sum()), rel_tol=1e-12)


def test_aggregate_weights_any_leading_shape():
    first = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    second = torch.tensor([[0.0, 1.0], [0.25, 0.75]])
    assert torch.equal(aggregate([first, second], [0.75, 0.25]), torch.tensor([[0.75, 0.25], [0.4375, 0.5625]]))


_P = torch.full((4,), 0.25)
_ROW = SparseRow(ids=torch.tensor([0, 2]), probs=torch.tensor([0.5, 0.25]), residual=0.25)
BAD_CALLS = {
    "k < 1": lambda: top_k(_P, 0),
    "k > vocab": lambda: top_k(_P, 5),
    "p not 1-D": lambda: top_k(_P[None], 1),
    "eps_target 1": lambda: adaptive_top_k(_P, 1.0, 3),
    "eps_target < 0": lambda: adaptive_top_k(_P, -0.1, 3),
    "eps_target nan": lambda: adaptive_top_k(_P, math.nan, 3),
    "cap 0": lambda: adaptive_top_k(_P, 0.1, 0),
    "unknown mode": lambda: reconstruct(_ROW, 4, "smear"),
    "id beyond vocab": lambda: reconstruct(_ROW, 2, "renormalize"),
    "weights sum": lambda: aggregate([_P, _P], [0.5, 0.49]),
    "weight <= 0": lambda: aggregate([_P, _P], [1.5, -0.5]),
    "weights count": lambda: aggregate([_P, _P], [1.0]),
    "no dists": lambda: aggregate([], []),
    "dist shapes": lambda: aggregate([_P, _P[:3]], [0.5, 0.5]),
    "logits 1-D": lambda: distributions(_P, 4, 1.0),
    "vocab > rows": lambda: distributions(_P[None], 5, 1.0),
    "temperature < 0": lambda: distributions(_P[None], 4, -1.0),
    "temperature nan": lambda: distributions(_P[None], 4, math.nan),
    "greedy p rows": lambda: accept_greedy([1, 2], _P.expand(2, 4)),
    "draft id": lambda: accept_greedy([4], _P.expand(2, 4)),
    "q shape": lambda: accept_sampled([1], _P.expand(2, 4), _P.expand(2, 4), _seeded(0)),
    "draft q = 0": lambda: accept_sampled([1], torch.tensor([[1.0, 0, 0, 0]]), _P.expand(2, 4), _seeded(0)),
    "row duplicates": lambda: SparseRow(ids=torch.tensor([1, 1]), probs=torch.tensor([0.2, 0.2]), residual=0.6),
    "row dtype": lambda: SparseRow(ids=torch.tensor([1]), probs=torch.tensor([0.2], dtype=torch.float64), residual=0.8),
    "row residual": lambda: SparseRow(ids=torch.tensor([1]), probs=torch.tensor([0.2]), residual=1.5),
    "row lengths": lambda: SparseRow(ids=torch.tensor([1, 2]), probs=torch.tensor([0.2]), residual=0.8),
    "row empty": lambda: SparseRow(ids=torch.tensor([], dtype=torch.int64), probs=torch.tensor([]), residual=1.0),
    "row negative": lambda: SparseRow(ids=torch.tensor([1]), probs=torch.tensor([-0.2]), residual=0.8),
    "overlap shapes": lambda: overlap(_P, _P[:3]),
    "l1 shapes": lambda: l1(_P, _P[:3]),
    "sample 2-D": lambda: sample(_P[None], None),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_raise_one_line_errors(call):
    with pytest.raises(FedAttnError) as raised:
        call()
    assert "\n" not in str(raised.value) and str(raised.value)
