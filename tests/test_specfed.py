"""SpecFed end to end in one process, against references computed here from plain forward calls:
the greedy ensemble step by step, HF ``generate`` for one worker, the exact ensemble distribution
of the first token, the spec's bounds on real model outputs, and the handshake's refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from fedattn.errors import FedAttnError
from fedattn.runtime.models import load_model
from fedattn.runtime.prompting import real_vocabulary, tokenizer_fingerprint
from fedattn.systems.specfed.config import SpecFedConfig, WorkerSpec
from fedattn.systems.specfed.drafts import LookupDraft, ModelDraft
from fedattn.systems.specfed.inprocess import WorkerModel, run_in_process

PROMPT = [60, 61, 62, 63, 60, 61, 62, 64, 65, 60, 61]


def settings(workers: list[tuple[str, float]], **overrides) -> SpecFedConfig:
    fields = {
        "workers": tuple(WorkerSpec(name, weight) for name, weight in workers),
        "draft": "tiny-random-draft",
        "gamma": 4,
        "top_k": None,
        "adaptive_eps": None,
        "reconstruct": "redistribute",
        "encoding": "f32",
        "temperature": 0.0,
        "seed": 0,
        "max_new_tokens": 12,
    }
    return SpecFedConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def family():
    """Three tiny models of one tokenizer: two workers (one with padding rows) and a draft."""
    torch.set_num_threads(1)
    return {name: load_model(name, progress=False) for name in ("tiny-random", "tiny-random-wide", "tiny-random-draft")}


def held(family, name: str) -> WorkerModel:
    loaded = family[name]
    return WorkerModel(loaded.model, real_vocabulary(loaded.tokenizer), tokenizer_fingerprint(loaded.tokenizer))


def reference_greedy(models: list[torch.nn.Module], weights: list[float], prompt: list[int], steps: int, vocab: int):
    """argmax of sum_i w_i softmax(z_i) over the real vocabulary, one full forward per model and step."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            p = sum(
                weight * torch.softmax(model(torch.tensor([sequence])).logits[0, -1, :vocab].double(), dim=-1)
                for model, weight in zip(models, weights)
            )
            sequence.append(int(torch.argmax(p)))
    return sequence[len(prompt) :]


@pytest.mark.parametrize("gamma", [0, 1, 4])
@pytest.mark.parametrize("draft", ["model", "lookup"])
def test_greedy_full_distributions_equal_the_step_by_step_ensemble(family, gamma, draft):
    weights = [("tiny-random", 0.6), ("tiny-random-wide", 0.4)]
    config = settings(weights, gamma=gamma)
    workers = [held(family, "tiny-random"), held(family, "tiny-random-wide")]
    vocab = workers[0].vocab
    drafter = ModelDraft(family["tiny-random-draft"].model, vocab, 0.0) if draft == "model" else LookupDraft(vocab)
    result = run_in_process(workers, drafter, PROMPT, config)
    expected = reference_greedy(
        [family["tiny-random"].model, family["tiny-random-wide"].model], [0.6, 0.4], PROMPT, 12, vocab
    )
    assert result.answer_token_ids == expected
    assert len(result.rounds) <= 12
    if gamma == 0:
        assert len(result.rounds) == 12 and all(round_.drafts == 0 for round_ in result.rounds)


def test_one_worker_of_weight_one_is_hf_generate(family):
    config = settings([("tiny-random", 1.0)], gamma=3, top_k=None)
    worker = held(family, "tiny-random")
    drafter = ModelDraft(family["tiny-random-draft"].model, worker.vocab, 0.0)
    result = run_in_process([worker], drafter, PROMPT, config)
    model = family["tiny-random"].model
    generated = model.generate(
        torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
    )
    assert result.answer_token_ids == generated[0, len(PROMPT) :].tolist()


def tiny_vocabulary_model(seed: int, blocks: int, vocab: int = 8) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=blocks,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.6,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def test_the_first_sampled_token_follows_the_exact_ensemble_distribution():
    """Speculative sampling over truncation-free records leaves the ensemble's distribution intact:
    the first token of many seeded runs (a draft accepted or replaced) against p computed here."""
    torch.set_num_threads(1)
    vocab, prompt, temperature = 8, [1, 2, 3], 1.0
    models = [tiny_vocabulary_model(1, 2), tiny_vocabulary_model(2, 1)]
    draft = tiny_vocabulary_model(3, 1)
    with torch.no_grad():
        p = sum(
            weight * torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / temperature, dim=-1)
            for model, weight in zip(models, [0.7, 0.3])
        )
        q = torch.softmax(draft(torch.tensor([prompt])).logits[0, -1].double() / temperature, dim=-1)
    assert float((p - q).abs().sum()) > 0.3  # the draft's own distribution would fail the check below
    workers = [WorkerModel(model, vocab, b"tiny-voc") for model in models]
    runs, counts = 1500, torch.zeros(vocab, dtype=torch.float64)
    for seed in range(runs):
        config = settings([("a", 0.7), ("b", 0.3)], gamma=1, temperature=temperature, seed=seed, max_new_tokens=2)
        result = run_in_process(workers, ModelDraft(draft, vocab, temperature), prompt, config)
        counts[result.answer_token_ids[0]] += 1
    assert float((counts / runs - p).abs().sum()) < 0.12


@pytest.mark.parametrize("reconstruct", ["renormalize", "redistribute"])
@pytest.mark.parametrize("adaptive", [None, 0.2])
def test_the_spec_bounds_hold_on_model_outputs(family, reconstruct, adaptive):
    config = settings(
        [("tiny-random", 0.5), ("tiny-random-wide", 0.5)],
        top_k=8,
        adaptive_eps=adaptive,
        reconstruct=reconstruct,
        temperature=1.0,
        seed=3,
    )
    workers = [held(family, "tiny-random"), held(family, "tiny-random-wide")]
    drafter = ModelDraft(family["tiny-random-draft"].model, workers[0].vocab, 1.0)
    measured = run_in_process(workers, drafter, PROMPT, config).measurement
    assert measured.aggregation_bias and measured.acceptance_bias
    assert max(measured.residual_mass) > 0.05  # K = 8 of 259 really truncates
    for bias, residual in zip(measured.aggregation_bias, measured.residual_mass):
        assert bias <= 2 * residual + 1e-5
    for bias, residual in zip(measured.acceptance_bias, measured.draft_residual_mass, strict=True):
        assert bias <= residual + 1e-5


def test_a_worker_of_another_tokenizer_is_refused_at_the_handshake(family):
    config = settings([("tiny-random", 0.5), ("tiny-random-wide", 0.5)])
    good = held(family, "tiny-random")
    other = WorkerModel(family["tiny-random-wide"].model, good.vocab, b"\x01" * 8)
    drafter = LookupDraft(good.vocab)
    with pytest.raises(FedAttnError, match="worker2 .*another tokenizer.*must share one"):
        run_in_process([good, other], drafter, PROMPT, config)


def test_fidelity_measures_the_real_path_against_the_spec(family):
    """Teacher-forced figures: full f32 distributions rebuild p exactly at 4 |V| bytes per worker and
    position; K = 8 costs 8 (id + probability) and obeys the aggregation bound; packed is smaller."""
    from fedattn.systems.specfed.fidelity import measure, teacher_forced

    workers = [held(family, "tiny-random"), held(family, "tiny-random-wide")]
    vocab, sequence = workers[0].vocab, PROMPT + [70, 71, 72, 73, 74]
    truths = [teacher_forced(worker.model, sequence, len(PROMPT), vocab, 1.0) for worker in workers]
    q = teacher_forced(family["tiny-random-draft"].model, sequence, len(PROMPT), vocab, 1.0)
    weights = [("tiny-random", 0.5), ("tiny-random-wide", 0.5)]
    full = measure(truths, q, settings(weights, top_k=None), vocab)
    assert full.aggregation_bias < 1e-5 and full.argmax_agreement == 1.0 and full.residual_mass < 1e-6
    assert full.bytes_per_position == 2 * 4 * vocab
    kept = measure(truths, q, settings(weights, top_k=8, reconstruct="renormalize"), vocab)
    assert kept.bytes_per_position == 2 * 8 * (4 + 4)
    assert 0.05 < kept.residual_mass and kept.aggregation_bias <= 2 * kept.residual_mass + 1e-5
    assert kept.acceptance_bias <= kept.residual_mass + 1e-5
    packed = measure(truths, q, settings(weights, top_k=8, encoding="packed"), vocab)
    assert packed.bytes_per_position == 2 * (9 + 8 + 4)  # 8 ids of 9 bits (259 tokens), 8 one-byte codes, eps


@pytest.mark.parametrize("reconstruct", ["renormalize", "redistribute"])
def test_greedy_speculation_never_changes_the_compressed_ensembles_tokens(family, reconstruct):
    """Greedy rounds decode argmax of the rebuilt aggregate whatever the drafts: gamma 4 with either
    draft gives gamma 0's tokens at the same K."""
    weights = [("tiny-random", 0.6), ("tiny-random-wide", 0.4)]
    workers = [held(family, "tiny-random"), held(family, "tiny-random-wide")]
    vocab = workers[0].vocab
    plain = run_in_process(
        workers, LookupDraft(vocab), PROMPT, settings(weights, gamma=0, top_k=8, reconstruct=reconstruct)
    )
    for drafter in (ModelDraft(family["tiny-random-draft"].model, vocab, 0.0), LookupDraft(vocab)):
        config = settings(weights, gamma=4, top_k=8, reconstruct=reconstruct)
        assert run_in_process(workers, drafter, PROMPT, config).answer_token_ids == plain.answer_token_ids
