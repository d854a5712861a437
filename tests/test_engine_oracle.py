"""The engine against the mask-based oracle: same tokens for every schedule of the spec."""

import pytest
import torch
from conftest import random_segments
from oracle import oracle_generate, spec_visibility

from fedattn.runtime.decoding import StopRule
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import run_in_process
from fedattn.systems.fedattn.schedule import Schedule, all_layers, every, placement, sync_count
from fedattn.systems.fedattn.sparsity import Sparsity, kept_indices, sent_indices

MAX_NEW = 8
LENGTHS = [9, 13, 6, 11]


def check_against_oracle(tiny, num_parties, schedule: Schedule, sparsity=Sparsity(), all_answers=False, seed=1):
    model, tokenizer = tiny
    segments = random_segments(LENGTHS[:num_parties], seed=seed)
    config = RunConfig(
        schedule=schedule, sparsity=sparsity, max_new_tokens=MAX_NEW, all_answers=all_answers, record_logits=True
    )
    result = run_in_process(model, segments, config, StopRule(frozenset({tokenizer.eos_token_id})))

    publisher = num_parties - 1
    kept = [kept_indices(sparsity, n, len(s), n == publisher) for n, s in enumerate(segments)]

    def sent(party, layer):
        return sent_indices(sparsity, party, layer, len(kept[party]), party == publisher)

    visible = spec_visibility(
        set(schedule.sync_layers), num_parties, schedule.publisher_layers, schedule.publisher_sync_every
    )
    expected, first_logits = oracle_generate(model, segments, visible, kept, sent, publisher, None, MAX_NEW)
    assert result.answer_token_ids == expected
    assert torch.allclose(result.answer_logits[0], first_logits, atol=1e-4)
    if all_answers:
        for party in range(publisher):
            tokens, _ = oracle_generate(model, segments, visible, kept, sent, party, expected[0], MAX_NEW)
            assert result.answers[party] == tokens, f"party {party}"
    return result


@pytest.mark.parametrize("num_parties", [2, 3, 4])
@pytest.mark.parametrize("interval", [1, 2, 3, 8])
def test_sync_every(tiny, num_parties, interval):
    layers = tiny[0].config.num_hidden_layers
    check_against_oracle(tiny, num_parties, Schedule(layers, every(interval, layers)), seed=num_parties * 10 + interval)


@pytest.mark.parametrize("name", ["shallow-half", "deep-half", "progressive", "regressive"])
def test_placements(tiny, name):
    layers = tiny[0].config.num_hidden_layers
    check_against_oracle(tiny, 3, Schedule(layers, placement(name, sync_count(3, layers), layers)), all_answers=True)


def test_explicit_sync_layers_every_answer(tiny):
    check_against_oracle(tiny, 4, Schedule(8, (1, 5, 6)), all_answers=True, seed=5)


@pytest.mark.parametrize("collaborator_sync", [(), (0, 4)])
def test_publisher_dense(tiny, collaborator_sync):
    result = check_against_oracle(
        tiny, 4, Schedule(8, collaborator_sync, publisher_layers=all_layers(8)), all_answers=True, seed=7
    )
    # the publisher sends its K/V only at collaborator syncs: 11 tokens x 2 heads x 16 dims x (K, V) x 4 bytes
    assert result.parties[-1].kv_payload_sent == len(collaborator_sync) * 11 * 2 * 16 * 2 * 4


@pytest.mark.parametrize(
    "publisher_layers, collaborator_sync", [((4, 5, 6, 7), ()), ((0, 1, 2, 3), (6,)), ((1, 3, 5), (3,))]
)
def test_publisher_receives_at_some_blocks(tiny, publisher_layers, collaborator_sync):
    check_against_oracle(
        tiny, 3, Schedule(8, collaborator_sync, publisher_layers=publisher_layers), all_answers=True, seed=11
    )


def test_publisher_dense_differs_from_local_only(tiny):
    """A guard that the oracle comparison has teeth: receiving K/V must change the publisher's view."""
    dense = check_against_oracle(tiny, 3, Schedule(8, (), publisher_layers=all_layers(8)), seed=3)
    alone = check_against_oracle(tiny, 3, Schedule(8, ()), seed=3)
    assert not torch.allclose(dense.answer_logits[0], alone.answer_logits[0], atol=1e-3)


def test_extra_publisher_sync(tiny):
    check_against_oracle(tiny, 3, Schedule(8, (0, 4), publisher_sync_every=2), all_answers=True, seed=11)


@pytest.mark.parametrize(
    "sparsity",
    [
        Sparsity(comp=0.5, seed=3),
        Sparsity(comm=0.4, seed=4),
        Sparsity(comp=0.7, comm=0.5, comp_publisher=1.0, comm_publisher=1.0, seed=5),
        Sparsity(comp=0.6, comm=0.6, comp_publisher=0.3, comm_publisher=0.5, seed=6),
    ],
)
def test_sparse(tiny, sparsity):
    check_against_oracle(tiny, 3, Schedule(8, every(2, 8), publisher_sync_every=3), sparsity, all_answers=True, seed=13)


def test_sparse_publisher_dense(tiny):
    check_against_oracle(
        tiny, 4, Schedule(8, (2,), publisher_layers=all_layers(8)), Sparsity(comp=0.8, comm=0.5, seed=9), seed=17
    )


@pytest.mark.parametrize(
    "select,sparsity,budget",
    [
        ("key-norm", Sparsity(comm=0.5, seed=2), None),
        ("attention", Sparsity(comp=0.8, comm=0.6, seed=3), None),
        ("attention", Sparsity(), 8000),
        ("random", Sparsity(comm=0.7, seed=4), 6000),
    ],
)
def test_importance_selection_and_budget(tiny, monkeypatch, select, sparsity, budget):
    """The engine sends what its selection chose, and attends exactly as the oracle does given
    the same chosen tokens (what each method chooses is tested on crafted tensors elsewhere)."""
    import fedattn.systems.fedattn.party as participant
    from fedattn.systems.fedattn.exchange import Exchange

    chosen: dict[tuple[int, int], torch.Tensor] = {}
    original = participant.select_tokens

    def recording(method, count, key, query, positions, scaling, seed, party, layer):
        indices = original(method, count, key, query, positions, scaling, seed, party, layer)
        chosen[(party, layer)] = indices
        return indices

    monkeypatch.setattr(participant, "select_tokens", recording)
    model, tokenizer = tiny
    schedule = Schedule(8, (0, 3, 6), publisher_layers=all_layers(8))
    segments = random_segments(LENGTHS[:3], seed=19)
    config = RunConfig(
        schedule, sparsity, exchange=Exchange(select=select, budget=budget), max_new_tokens=MAX_NEW, record_logits=True
    )
    result = run_in_process(model, segments, config, StopRule(frozenset({tokenizer.eos_token_id})))
    assert chosen, "nothing was sent"

    publisher = 2
    kept = [kept_indices(sparsity, n, len(s), n == publisher) for n, s in enumerate(segments)]

    def sent(party, layer):
        return chosen.get((party, layer), torch.arange(len(kept[party])))

    visible = spec_visibility(set(schedule.sync_layers), 3, schedule.publisher_layers)
    expected, first_logits = oracle_generate(model, segments, visible, kept, sent, publisher, None, MAX_NEW)
    assert result.answer_token_ids == expected
    assert torch.allclose(result.answer_logits[0], first_logits, atol=1e-4)
    if select != "random" and sparsity.comm < 1:  # not simply the paper's draw
        assert any(
            not torch.equal(chosen[key], sent_indices(sparsity, key[0], key[1], len(kept[key[0]]), False))
            for key in chosen
        )
