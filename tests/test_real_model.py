"""Checks on the default real model; skipped, with the reason, when it is not installed."""

from pathlib import Path

import pytest
import torch

from fedattn.runtime.decoding import stop_rule
from fedattn.runtime.models import DEFAULT_MODEL, KNOWN_MODELS, cache_complete, load_model
from fedattn.runtime.prompting import build_segments
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import run_in_process
from fedattn.systems.fedattn.query import answer_question
from fedattn.systems.fedattn.schedule import Schedule, all_layers, every

pytestmark = pytest.mark.real_model
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"
QUESTION = "What is Marta Kowalski's employee ID? Answer with the number only."


@pytest.fixture(scope="module")
def qwen():
    if not cache_complete(KNOWN_MODELS[DEFAULT_MODEL]):
        pytest.skip(f"{DEFAULT_MODEL} is not installed here: run `make demo` or `fedattn install {DEFAULT_MODEL}`")
    return load_model(DEFAULT_MODEL, progress=False)


def test_sync_every_block_equals_centralized_generation(qwen):
    model, tokenizer = qwen.model, qwen.tokenizer
    contexts = [(DEMO / "party1.txt").read_text(), (DEMO / "party2.txt").read_text()]
    segments = build_segments(tokenizer, contexts, QUESTION)
    layers = model.config.num_hidden_layers
    config = RunConfig(Schedule(layers, every(1, layers)), max_new_tokens=12)
    result = run_in_process(model, segments, config, stop_rule(tokenizer, model))
    ids = torch.tensor([sum(segments, [])])
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert result.answer_token_ids == reference[0, ids.shape[1] :].tolist()


def test_publisher_dense_answers_from_another_partys_record(qwen):
    """The demo: only party 1 holds the ID; the publisher alone cannot know it."""
    contexts = [(DEMO / "party1.txt").read_text(), (DEMO / "party2.txt").read_text()]
    layers = qwen.model.config.num_hidden_layers
    config = RunConfig(Schedule(layers, (), publisher_layers=all_layers(layers)), max_new_tokens=16)
    report = answer_question(qwen.model, qwen.tokenizer, contexts, QUESTION, config)
    assert "5521" in report.answer
    alone = answer_question(qwen.model, qwen.tokenizer, [], QUESTION, config)
    assert "5521" not in alone.answer
