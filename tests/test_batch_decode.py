"""Decoding several queries in one batch gives every party of every query the tokens it gets alone.

The reference is ``run_in_process`` on each query by itself (one row, no padding), which the
oracle tests hold to the spec token for token; the batch mixes queries of different lengths, so
rows are padded differently per block and leave the batch at different steps.
"""

import pytest
import torch
from conftest import random_segments

from fedattn.runtime.decoding import Decoding, StopRule
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import run_in_process, run_many_in_process
from fedattn.systems.fedattn.schedule import Schedule, all_layers, every

LENGTHS = ([9, 13, 6], [4, 20, 11], [15, 3, 7], [8, 8, 8])
# a third of the byte vocabulary ends an answer, so random-weight rows stop at different steps
STOP = StopRule(frozenset(range(0, 259, 3)))


def queries() -> list[list[list[int]]]:
    return [random_segments(list(lengths), seed=seed) for seed, lengths in enumerate(LENGTHS)]


@pytest.mark.parametrize(
    "schedule, all_answers, decoding",
    [
        (Schedule(8, every(2, 8)), False, Decoding()),
        (Schedule(8, (), publisher_layers=all_layers(8)), True, Decoding()),
        (Schedule(8, (3,)), True, Decoding(temperature=0.9, top_k=40, seed=3)),
    ],
    ids=["H=2", "publisher-dense-every-answer", "sampling-every-answer"],
)
def test_batch_equals_one_at_a_time(tiny, schedule, all_answers, decoding):
    model, _ = tiny
    config = RunConfig(
        schedule=schedule, decoding=decoding, max_new_tokens=12, all_answers=all_answers, record_logits=True
    )
    alone = [run_in_process(model, segments, config, STOP) for segments in queries()]
    together = run_many_in_process(model, queries(), config, STOP)
    lengths = {len(tokens) for result in alone for tokens in result.answers.values()}
    assert len(lengths) > 1, "the rows must stop at different steps for this test to mean anything"
    for single, batched in zip(alone, together):
        assert batched.answers == single.answers
        assert len(batched.answer_logits) == len(single.answer_logits)
        for left, right in zip(batched.answer_logits, single.answer_logits):
            assert torch.allclose(left, right, atol=1e-5)
        assert [party.bytes_sent for party in batched.parties] == [party.bytes_sent for party in single.parties]


def test_batched_decode_shares_the_time(tiny):
    model, _ = tiny
    config = RunConfig(schedule=Schedule(8, every(4, 8)), max_new_tokens=6)
    results = run_many_in_process(model, queries(), config, STOP)
    assert len({result.decode_s for result in results}) == 1
    assert all(result.prefill_s > 0 for result in results)
