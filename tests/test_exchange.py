"""What leaves a party at a sync block: token selection (--kv-select), the byte budget
(--kv-budget) and the noise defense (--kv-noise), as units on crafted tensors and end to end."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_segments

from fedattn.errors import FedAttnError
from fedattn.network.frames import HELLO_FRAME, SMALL_FRAME, Hello, kv_frame_size
from fedattn.network.handshake import check_hello, run_fingerprints
from fedattn.network.kv_codec import get_codec
from fedattn.privacy.noise import add_kv_noise, noise_generator
from fedattn.runtime.dims import ModelDims
from fedattn.systems.fedattn import selection
from fedattn.systems.fedattn.budget import Frame, fit_budget
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.costs import expected_costs
from fedattn.systems.fedattn.exchange import Exchange, frame_token_counts
from fedattn.systems.fedattn.inprocess import _prefill, run_in_process
from fedattn.systems.fedattn.schedule import Schedule, all_layers, every
from fedattn.systems.fedattn.selection import attention_scores, key_norm_scores, select_tokens
from fedattn.systems.fedattn.sparsity import Sparsity, sent_indices

# ---------------------------------------------------------------------------------------------
# Selection on crafted tensors


def keys_with_norms(norms: list[list[float]], head_dim: int = 4) -> torch.Tensor:
    """(heads, tokens, head_dim) keys whose per-head token norms are ``norms``, random directions."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(len(norms), len(norms[0]), head_dim, generator=generator)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    return directions * torch.tensor(norms).unsqueeze(-1)


def test_key_norm_picks_the_largest_mean_norms():
    key = keys_with_norms([[1, 5, 2, 8, 3, 0.5], [1, 1, 9, 1, 1, 1]])  # means 1, 3, 5.5, 4.5, 2, 0.75
    torch.testing.assert_close(key_norm_scores(key), torch.tensor([1, 3, 5.5, 4.5, 2, 0.75]))
    chosen = select_tokens("key-norm", 3, key, None, torch.arange(6), None, 0, 0, 0)
    assert chosen.tolist() == [1, 2, 3]
    assert select_tokens("key-norm", 1, key, None, torch.arange(6), None, 0, 0, 0).tolist() == [2]


def test_ties_go_to_the_earlier_token_and_everything_when_count_covers_all():
    key = torch.zeros(1, 4, 4)
    key[0, :, 1] = torch.tensor([2.0, 1.0, 2.0, 2.0])  # exact, equal norms
    assert select_tokens("key-norm", 2, key, None, torch.arange(4), None, 0, 0, 0).tolist() == [0, 2]
    for method in ("random", "key-norm", "attention"):
        assert select_tokens(method, 4, key, None, torch.arange(4), None, 0, 0, 0).tolist() == [0, 1, 2, 3]


def test_attention_picks_the_token_every_later_query_looks_at():
    """All queries point one way; only token 3's key does: queries 3..5 put ~all their mass on it.
    The others' keys are zero, so earlier queries spread evenly: token 0 gets 1 + 1/2 + 1/3."""
    heads, tokens, head_dim = 2, 6, 4
    query = torch.zeros(2 * heads, tokens, head_dim)
    query[..., 0] = 1.0
    key = torch.zeros(heads, tokens, head_dim)
    key[:, 3, 0] = 50.0
    positions = torch.arange(100, 100 + tokens)
    mass = attention_scores(query, key, positions, scaling=1.0) / (2 * heads)
    torch.testing.assert_close(mass[:3], torch.tensor([1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]), atol=1e-4, rtol=0)
    assert mass[3] == pytest.approx(3.0, abs=1e-4)
    assert select_tokens("attention", 1, key, query, positions, 1.0, 0, 0, 0).tolist() == [3]
    assert select_tokens("attention", 2, key, query, positions, 1.0, 0, 0, 0).tolist() == [0, 3]


def reference_attention_mass(query, key, positions, scaling) -> list[float]:
    """Column sums of causal softmax attention, one query and one head at a time (GQA by hand)."""
    groups = query.shape[0] // key.shape[0]
    mass = [0.0] * key.shape[1]
    for head in range(query.shape[0]):
        k = key[head // groups]
        for q in range(query.shape[1]):
            visible = [j for j in range(key.shape[1]) if positions[j] <= positions[q]]
            scores = [float(query[head, q] @ k[j]) * scaling for j in visible]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            for j, weight in zip(visible, weights):
                mass[j] += weight / sum(weights)
    return mass


@pytest.mark.parametrize("chunk", [2, 256])
def test_attention_mass_matches_a_loop_reference(monkeypatch, chunk):
    monkeypatch.setattr(selection, "QUERY_CHUNK", chunk)
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(4, 7, 8, generator=generator)
    key = torch.randn(2, 7, 8, generator=generator)
    positions = torch.tensor([3, 5, 6, 9, 10, 14, 15])  # kept tokens: gaps in positions
    expected = reference_attention_mass(query, key, positions, 0.35)
    torch.testing.assert_close(
        attention_scores(query, key, positions, 0.35), torch.tensor(expected), atol=1e-5, rtol=1e-5
    )


def test_random_selection_is_the_papers_sparse_draw():
    sparsity = Sparsity(comm=0.4, seed=7)
    key = torch.randn(2, 20, 4)
    drawn = select_tokens("random", 8, key, None, torch.arange(20), None, 7, 2, 5)
    assert torch.equal(drawn, sent_indices(sparsity, 2, 5, 20, is_publisher=False))


# ---------------------------------------------------------------------------------------------
# Budget planning


def toy_size(tokens: int, whole: bool) -> int:
    return 20 + (0 if whole else 4 * tokens) + 10 * tokens


def test_budget_plan_water_fills_and_never_exceeds():
    frames = [Frame((0, 0), 3, 3), Frame((1, 0), 50, 50), Frame((2, 0), 40, 60)]
    for budget in range(3 * toy_size(1, False), 2000, 7):
        counts = fit_budget(frames, budget, toy_size)
        total = sum(toy_size(counts[f.key], counts[f.key] == f.segment) for f in frames)
        assert total <= budget
        assert all(1 <= counts[f.key] <= f.wanted for f in frames)
    # an even share is 200 bytes: the 3-token frame needs 50 and takes it, the others split the rest
    counts = fit_budget(frames, 600, toy_size)
    assert counts[(0, 0)] == 3
    assert counts[(1, 0)] == counts[(2, 0)] == (275 - 20) // 14
    # enough for everything: every frame whole (no positions)
    full = sum(toy_size(f.wanted, f.wanted == f.segment) for f in frames)
    assert fit_budget(frames, full, toy_size) == {f.key: f.wanted for f in frames}


def test_budget_too_small_for_one_token_per_frame():
    frames = [Frame((0, layer), 5, 5) for layer in range(4)]
    fit_budget(frames, 4 * toy_size(1, False), toy_size)
    with pytest.raises(
        FedAttnError,
        match=r"--kv-budget 135 bytes cannot carry one token in each of this run's 4 K/V frames \(at least 136 bytes\)",
    ):
        fit_budget(frames, 4 * toy_size(1, False) - 1, toy_size)


def test_exchange_settings_are_validated():
    with pytest.raises(FedAttnError, match="^unknown K/V selection 'loud': choose one of random, key-norm, attention$"):
        Exchange(select="loud")
    with pytest.raises(FedAttnError, match="^the K/V budget must be a positive number of bytes"):
        Exchange(budget=0)
    with pytest.raises(FedAttnError, match="^the K/V noise must be a finite number >= 0"):
        Exchange(noise=-0.1)


LENGTHS = [9, 14, 6]
SCHEDULES = {
    "every-2": (Schedule(8, every(2, 8)), False),
    "publisher-dense": (Schedule(8, (), publisher_layers=all_layers(8)), False),
    "all-to-all": (Schedule(8, (0, 5), publisher_sync_every=3), True),
}


def kv_bytes_sent(result, all_answers: bool) -> int:
    """Everything sent minus the control frames (hellos, first token, completion)."""
    parties = len(result.parties)
    control = parties * HELLO_FRAME.size + SMALL_FRAME.size * (2 if all_answers else 1)
    return sum(party.bytes_sent for party in result.parties) - control


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("codec_name", ["float32", "int8", "int4-kivi"])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9])
def test_measured_kv_bytes_never_exceed_the_budget(tiny, one_torch_thread, schedule_name, codec_name, fraction):
    model, _ = tiny
    schedule, all_answers = SCHEDULES[schedule_name]
    codec = get_codec(codec_name)
    segments = random_segments(LENGTHS, seed=3)
    full = frame_token_counts(schedule, Sparsity(), Exchange(), codec, LENGTHS, 2, 16, all_answers)
    frames = len(full)
    everything = sum(
        kv_frame_size(tokens, tokens == LENGTHS[sender], codec, 2, 16) for (sender, _), tokens in full.items()
    )
    smallest = frames * kv_frame_size(1, False, codec, 2, 16)
    budget = smallest + int(fraction * (everything - smallest))  # between one token per frame and all
    exchange = Exchange(select="key-norm", budget=budget)
    config = RunConfig(schedule, codec=codec, exchange=exchange, max_new_tokens=2, all_answers=all_answers)
    result = run_in_process(model, segments, config)
    sent = kv_bytes_sent(result, all_answers)
    assert sent <= budget < everything
    # the plan uses the budget: what is left is less than one more token in each frame
    assert (
        budget - sent
        < frames * (kv_frame_size(2, False, codec, 2, 16) - kv_frame_size(1, False, codec, 2, 16)) + frames
    )
    costs = expected_costs(
        ModelDims.from_config(model.config), schedule, Sparsity(), codec, LENGTHS, all_answers, exchange
    )
    assert [p.bytes_sent for p in result.parties] == [c.wire_bytes_sent for c in costs]


def test_a_budget_above_the_traffic_changes_nothing(tiny, one_torch_thread):
    model, _ = tiny
    schedule = Schedule(8, every(2, 8))
    segments = random_segments(LENGTHS, seed=3)
    plain = run_in_process(model, segments, RunConfig(schedule, max_new_tokens=4, record_logits=True))
    capped = run_in_process(
        model, segments, RunConfig(schedule, exchange=Exchange(budget=10**9), max_new_tokens=4, record_logits=True)
    )
    assert capped.answer_token_ids == plain.answer_token_ids
    assert torch.equal(capped.answer_logits[0], plain.answer_logits[0])
    assert [p.bytes_sent for p in capped.parties] == [p.bytes_sent for p in plain.parties]


def test_engine_refuses_a_budget_below_one_token_per_frame(tiny):
    model, _ = tiny
    config = RunConfig(Schedule(8, every(2, 8)), exchange=Exchange(budget=500), max_new_tokens=2)
    with pytest.raises(FedAttnError, match="--kv-budget 500 bytes cannot carry one token"):
        run_in_process(model, random_segments(LENGTHS, seed=3), config)


# ---------------------------------------------------------------------------------------------
# Noise


def add_noise(key, value, sigma, seed, party, layer):
    """What a sender adds to one frame (its seeded draw for that party and block)."""
    return add_kv_noise(key, value, sigma, noise_generator(seed, party, layer))


def test_noise_has_sigma_times_each_channels_spread():
    generator = torch.Generator().manual_seed(5)
    spreads = torch.tensor([0.5, 2.0, 10.0])
    key = torch.randn(2, 4000, 3, generator=generator) * spreads + 7
    value = torch.zeros(2, 4000, 3)
    noisy_key, noisy_value = add_noise(key, value, 0.3, seed=1, party=0, layer=2)
    noise_std = (noisy_key - key).std(dim=1)
    torch.testing.assert_close(noise_std, 0.3 * key.std(dim=1, correction=0), rtol=0.05, atol=0)
    assert torch.equal(noisy_value, value)  # no spread, no noise
    again_key, _ = add_noise(key, value, 0.3, seed=1, party=0, layer=2)
    assert torch.equal(again_key, noisy_key)
    for other in (dict(seed=2, party=0, layer=2), dict(seed=1, party=1, layer=2), dict(seed=1, party=0, layer=3)):
        assert not torch.equal(add_noise(key, value, 0.3, **other)[0], noisy_key)
    one_token = key[:, :1]
    assert torch.equal(add_noise(one_token, one_token, 0.3, 1, 0, 2)[0], one_token)


def noisy_config(noise: float, seed: int = 0, **overrides) -> RunConfig:
    schedule = Schedule(8, (), publisher_layers=all_layers(8))
    return RunConfig(
        schedule,
        sparsity=Sparsity(seed=seed),
        exchange=Exchange(noise=noise),
        max_new_tokens=6,
        record_logits=True,
        **overrides,
    )


def test_noise_off_is_bit_identical_to_a_run_without_the_option(tiny, one_torch_thread):
    model, _ = tiny
    segments = random_segments(LENGTHS, seed=8)
    without = run_in_process(
        model,
        segments,
        RunConfig(Schedule(8, (), publisher_layers=all_layers(8)), max_new_tokens=6, record_logits=True),
    )
    off = run_in_process(model, segments, noisy_config(0.0))
    assert off.answer_token_ids == without.answer_token_ids
    assert all(torch.equal(a, b) for a, b in zip(off.answer_logits, without.answer_logits))


def test_noise_is_reproducible_changes_what_is_received_and_spares_the_senders_store(tiny, one_torch_thread):
    model, _ = tiny
    segments = random_segments(LENGTHS, seed=8)
    clean = run_in_process(model, segments, noisy_config(0.0))
    noisy = run_in_process(model, segments, noisy_config(0.5))
    again = run_in_process(model, segments, noisy_config(0.5))
    other_seed = run_in_process(model, segments, noisy_config(0.5, seed=1))
    assert (
        torch.equal(noisy.answer_logits[0], again.answer_logits[0]) and noisy.answer_token_ids == again.answer_token_ids
    )
    assert not torch.allclose(noisy.answer_logits[0], clean.answer_logits[0], atol=1e-4)
    assert not torch.equal(noisy.answer_logits[0], other_seed.answer_logits[0])
    # the same bytes cross either way
    assert [p.bytes_sent for p in noisy.parties] == [p.bytes_sent for p in clean.parties]

    from fedattn.runtime.attention import federated_attention_enabled
    from fedattn.runtime.decoding import StopRule

    with federated_attention_enabled(model):
        clean_parties, _, _ = _prefill(model, segments, noisy_config(0.0), StopRule(), "")
        noisy_parties, _, _ = _prefill(model, segments, noisy_config(0.5), StopRule(), "")
    for layer in range(8):
        for rank in (0, 1):  # collaborators: their stores hold only their own, clean K/V
            for ours, theirs in zip(noisy_parties[rank].store[layer].view(), clean_parties[rank].store[layer].view()):
                assert torch.equal(ours, theirs)
        publisher_key = noisy_parties[2].store[layer].view()[0]
        clean_key = clean_parties[2].store[layer].view()[0]
        own = slice(0, LENGTHS[2])  # the publisher's own entries come first, then what it received
        if layer == 0:  # deeper, its own K/V depends on the noisy K/V it attended to
            assert torch.equal(publisher_key[:, own], clean_key[:, own])
        assert not torch.allclose(publisher_key[:, LENGTHS[2] :], clean_key[:, LENGTHS[2] :])


def test_the_handshake_refuses_a_peer_with_other_exchange_settings(tiny):
    model, _ = tiny
    schedule = Schedule(8, every(2, 8))

    def hello(rank: int, exchange: Exchange) -> Hello:
        return Hello(rank, 2, 5, run_fingerprints(RunConfig(schedule, exchange=exchange), "weights", model.config))

    check_hello(hello(1, Exchange(noise=0.1)), hello(0, Exchange(noise=0.1)), "party-1", 0)
    for theirs in (Exchange(noise=0.2), Exchange(noise=0.1, budget=9000), Exchange(noise=0.1, select="attention")):
        with pytest.raises(FedAttnError, match=r"party-1 \(rank 0\) differs from rank 1 in K/V exchange$"):
            check_hello(hello(1, Exchange(noise=0.1)), hello(0, theirs), "party-1", 0)
