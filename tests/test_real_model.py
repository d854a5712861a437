"""Checks on the default real model and gemma3-270m; skipped, with the reason, when not installed."""

from pathlib import Path

import pytest
import torch

from fedattn.runtime.decoding import stop_rule
from fedattn.runtime.models import DEFAULT_MODEL, KNOWN_MODELS, LoadedModel, cache_complete, load_model
from fedattn.runtime.prompting import build_segments
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import run_in_process
from fedattn.systems.fedattn.query import answer_question
from fedattn.systems.fedattn.schedule import Schedule, all_layers, every

pytestmark = pytest.mark.real_model
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"
QUESTION = "What is Marta Kowalski's employee ID? Answer with the number only."
GEMMA = "gemma3-270m"


def load_installed(name: str, how: str) -> LoadedModel:
    """The model, or a skip that says ``how`` to install it."""
    if not cache_complete(KNOWN_MODELS[name]):
        pytest.skip(f"{name} is not installed here: run {how}")
    return load_model(name, progress=False)


@pytest.fixture(scope="module")
def qwen():
    return load_installed(DEFAULT_MODEL, f"`make demo` or `fedattn install {DEFAULT_MODEL}`")


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


@pytest.fixture(scope="module")
def gemma():
    return load_installed(GEMMA, f"`fedattn install {GEMMA}`")


def test_gemma_base_model_answers_a_plain_question_after_its_bos(gemma):
    """No chat template: a plain Question/Answer prompt, the tokenizer's own <bos> (id 2) first."""
    tokenizer = gemma.tokenizer
    assert tokenizer.chat_template is None
    prompt = "Question: What is the boiling point of water at sea level in degrees Celsius?\nAnswer:"
    ids = tokenizer(prompt).input_ids
    assert ids[0] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    with torch.inference_mode():
        output = gemma.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "100" in tokenizer.decode(output[0, len(ids) :])


def test_gemma_cache_has_one_kv_head_of_256_in_every_block(gemma):
    """50 tokens fit the sliding window (512), so sliding and global blocks alike hold all of them."""
    ids = gemma.tokenizer("The quick brown fox jumps over the lazy dog. " * 8).input_ids[:50]
    with torch.inference_mode():
        cache = gemma.model(torch.tensor([ids]), use_cache=True).past_key_values
    assert len(cache.layers) == 18
    assert [index for index, kind in enumerate(gemma.model.config.layer_types) if kind == "full_attention"] == [
        5,
        11,
        17,
    ]
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == tuple(layer.values.shape) == (1, 1, 50, 256)
