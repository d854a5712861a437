"""H = 1 and N = 1 against HF generate on the concatenated ids (tokens exact, logits within 1e-4)."""

import pytest
import torch
from conftest import random_segments

from fedattn.runtime.decoding import Decoding, StopRule
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import run_in_process
from fedattn.systems.fedattn.schedule import Schedule, every

MAX_NEW = 12


def hf_generate(model, ids, max_new):
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    return out.sequences[0, len(ids) :].tolist(), [score[0] for score in out.scores]


@pytest.mark.parametrize("lengths", [[31], [5, 17, 9], [3, 4, 5, 6]])
def test_centralized_equivalence(tiny, lengths):
    model, tokenizer = tiny
    segments = random_segments(lengths, seed=sum(lengths))
    layers = model.config.num_hidden_layers
    config = RunConfig(schedule=Schedule(layers, every(1, layers)), max_new_tokens=MAX_NEW, record_logits=True)
    result = run_in_process(model, segments, config, StopRule(frozenset({tokenizer.eos_token_id})))
    tokens, scores = hf_generate(model, sum(segments, []), MAX_NEW)
    assert result.answer_token_ids == tokens
    assert len(result.answer_logits) == len(scores)
    for ours, theirs in zip(result.answer_logits, scores):
        assert (ours - theirs).abs().max().item() < 1e-4


def test_single_party_ignores_schedule(tiny):
    """N = 1 is centralized whatever the schedule: there is nobody to exchange with."""
    model, _ = tiny
    segments = random_segments([23], seed=4)
    config = RunConfig(schedule=Schedule(8, (3,)), max_new_tokens=MAX_NEW)
    result = run_in_process(model, segments, config)
    assert result.answer_token_ids == hf_generate(model, segments[0], MAX_NEW)[0]
    assert result.parties[0].bytes_sent == 0


def test_sampling_is_seeded(tiny):
    model, _ = tiny
    segments = random_segments([7, 9], seed=8)

    def sample(seed):
        decoding = Decoding(temperature=1.0, top_k=50, top_p=0.95, seed=seed)
        return run_in_process(
            model, segments, RunConfig(Schedule(8, (0, 4)), decoding=decoding, max_new_tokens=16)
        ).answer_token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_stop_text_ends_decoding_and_trims(tiny):
    """A stop text in what the publisher wrote ends decoding at that token: the tokens equal HF
    generate's up to and including the one that completes the stop text."""
    model, tokenizer = tiny
    segments = random_segments([11, 7], seed=21)
    config = RunConfig(Schedule(8, every(1, 8)), max_new_tokens=20)
    free = run_in_process(model, segments, config).answer_token_ids
    stop_text = tokenizer.decode(free[3:5])  # appears once the 5th token is written
    rule = StopRule(texts=(stop_text,), decode=tokenizer.decode)
    stopped = run_in_process(model, segments, config, rule).answer_token_ids
    written = next(n for n in range(1, len(free) + 1) if stop_text in tokenizer.decode(free[:n][-16:]))
    assert stopped == free[:written]
    assert rule.trim(tokenizer.decode(stopped)) == tokenizer.decode(stopped).split(stop_text)[0]
