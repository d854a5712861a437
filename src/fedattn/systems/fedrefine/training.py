"""Training a projector set for one (receiver, sharer) pair, both models frozen.

The loss is the receiver's next-token cross-entropy on the response tokens (the end-of-turn token
included, so it learns to stop), with the fused cache standing in for its own over the prompt's
first N - 1 tokens, exactly as at inference. Everything the frozen models produce before fusion
is precomputed once per example and kept on disk (``features/``): the receiver's K/V over the
prompt and the sharer's K/V at its sent blocks. A step then costs the projectors over the prompt
and the receiver's forward and backward over the response alone, which is what makes a CPU run
possible. Optimisation follows C2C: AdamW (weight decay 0.01), linear warm-up over the first 10%
of steps then linear decay, gradient clipping at 1.0, the gate temperature annealed over the run.

A run writes into one folder and resumes from it: features already computed are kept, the
checkpoint holds the projectors, the optimiser, the schedule, the step and the random state, so
an interrupted run continues to the state an uninterrupted one reaches. ``log.jsonl`` records the
training loss per step and the held-out loss (hard gates, as at inference) every few steps; the
projector is written with its training configuration and held-out losses at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file, save_file

from fedattn.errors import FedAttnError
from fedattn.report.render import progress_bar
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.models import LoadedModel
from fedattn.systems.fedrefine.alignment import receiver_prompt, same_tokenizer, sent_blocks, sharer_input
from fedattn.systems.fedrefine.alignment import sharer_request as build_request
from fedattn.systems.fedrefine.caches import cache_dims, pair_dims, read_sharer_cache, receiver_prefill
from fedattn.systems.fedrefine.projector import ProjectorInfo, ProjectorSet, ProjectorShape

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
FEATURES = "features"
FEATURE_DTYPE = torch.bfloat16  # half the disk of float32; the projectors compute in float32

_console = Console(stderr=True)


@dataclass(frozen=True)
class Example:
    """A prompt (the user message) and the response the receiver should give."""

    prompt: str
    response: str


@dataclass(frozen=True)
class TrainingConfig:
    """How a projector set is trained; stored beside the weights."""

    receiver: str
    sharer: str
    shape: ProjectorShape = field(default_factory=ProjectorShape)
    epochs: int = 2
    batch: int = 8  # examples per optimiser step (gradients accumulated)
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    clip: float = 1.0
    max_prompt_tokens: int = 512
    max_response_tokens: int = 64
    eval_every: int = 10
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # where the examples came from (sources, counts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Feature:
    """One precomputed example: the receiver's prompt and response ids, the fused positions, the
    receiver's K/V per block over the prompt's first N - 1 tokens, the sharer's per sent block."""

    prompt_ids: list[int]
    response_ids: list[int]
    positions: torch.Tensor
    receiver_keys: list[torch.Tensor]
    receiver_values: list[torch.Tensor]
    sharer: dict[int, tuple[torch.Tensor, torch.Tensor]]


def precompute(
    directory: Path,
    receiver: LoadedModel,
    sharer: LoadedModel,
    examples: dict[str, list[Example]],
    config: TrainingConfig,
    quiet: bool = False,
) -> dict[str, list[Path]]:
    """Every example's features under ``directory/features`` (kept across runs), per split name."""
    folder = directory / FEATURES
    folder.mkdir(parents=True, exist_ok=True)
    split = SplitModel(receiver.model)
    same = same_tokenizer(receiver.tokenizer, sharer.tokenizer)
    blocks = sent_blocks(cache_dims(receiver.model).blocks, cache_dims(sharer.model).blocks)
    paths = {name: [feature_path(folder, example) for example in items] for name, items in examples.items()}
    todo = dict(
        (path, example)
        for name, items in examples.items()
        for path, example in zip(paths[name], items)
        if not path.exists()
    )
    total = len({path for name in paths for path in paths[name]})
    with progress_bar("caching the frozen models' K/V", total, completed=total - len(todo), quiet=quiet) as advance:
        for path, example in todo.items():
            tensors = _features(split, receiver, sharer, example, same, blocks, config)
            _write_atomic(path, lambda target, tensors=tensors: save_file(tensors, str(target)))
            advance()
    return paths


def feature_path(folder: Path, example: Example) -> Path:
    """Named by the example's content, so runs drawing overlapping examples share their features."""
    digest = hashlib.sha256(f"{example.prompt}\0{example.response}".encode()).hexdigest()[:20]
    return folder / f"{digest}.safetensors"


def _features(
    split: SplitModel,
    receiver: LoadedModel,
    sharer: LoadedModel,
    example: Example,
    same: bool,
    blocks: list[int],
    config: TrainingConfig,
) -> dict[str, torch.Tensor]:
    prompt = receiver_prompt(receiver.tokenizer, example.prompt)
    if len(prompt.ids) > config.max_prompt_tokens:
        prompt = receiver_prompt(receiver.tokenizer, _shortened(receiver, example.prompt, len(prompt.ids), config))
    response = receiver.tokenizer(example.response, add_special_tokens=False).input_ids[: config.max_response_tokens]
    response.append(_end_of_turn(receiver))
    request = build_request(prompt, receiver.tokenizer, same)
    shared = read_sharer_cache(sharer.model, sharer_input(request, sharer.tokenizer), blocks)
    store = receiver_prefill(split, prompt.ids[:-1])
    tensors = {
        "prompt_ids": torch.tensor(prompt.ids),
        "response_ids": torch.tensor(response),
        "positions": torch.tensor(request.positions, dtype=torch.long),
    }
    for block in range(split.num_blocks):
        keys, values, _ = store[block].view()
        tensors[f"receiver.key.{block}"] = keys.to(FEATURE_DTYPE).contiguous()
        tensors[f"receiver.value.{block}"] = values.to(FEATURE_DTYPE).contiguous()
    for block, keys, values in zip(shared.blocks, shared.keys, shared.values, strict=True):
        tensors[f"sharer.key.{block}"] = keys.to(FEATURE_DTYPE).contiguous()
        tensors[f"sharer.value.{block}"] = values.to(FEATURE_DTYPE).contiguous()
    return tensors


def _shortened(receiver: LoadedModel, text: str, length: int, config: TrainingConfig) -> str:
    """The prompt's text cut from its start so the templated prompt fits ``max_prompt_tokens``."""
    ids = receiver.tokenizer(text, add_special_tokens=False).input_ids
    keep = max(1, len(ids) - (length - config.max_prompt_tokens))
    return receiver.tokenizer.decode(ids[-keep:])


def _end_of_turn(receiver: LoadedModel) -> int:
    token = receiver.tokenizer.eos_token_id
    if token is None:
        raise FedAttnError(f"{receiver.name}'s tokenizer has no end-of-sequence token to train stopping on")
    return int(token)


def read_feature(path: Path) -> Feature:
    tensors = load_file(str(path))
    blocks = sum(1 for name in tensors if name.startswith("receiver.key."))
    sharer_blocks = sorted(int(name.rsplit(".", 1)[1]) for name in tensors if name.startswith("sharer.key."))
    return Feature(
        prompt_ids=tensors["prompt_ids"].tolist(),
        response_ids=tensors["response_ids"].tolist(),
        positions=tensors["positions"],
        receiver_keys=[tensors[f"receiver.key.{block}"] for block in range(blocks)],
        receiver_values=[tensors[f"receiver.value.{block}"] for block in range(blocks)],
        sharer={block: (tensors[f"sharer.key.{block}"], tensors[f"sharer.value.{block}"]) for block in sharer_blocks},
    )


def example_loss(split: SplitModel, projectors: ProjectorSet, feature: Feature) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the response tokens, their count) with the fused prompt cache."""
    keys, values = fused_prefix(projectors, feature)
    inputs = [feature.prompt_ids[-1], *feature.response_ids[:-1]]
    logits = logits_over_prefix(split, keys, values, inputs)
    targets = torch.tensor(feature.response_ids, device=logits.device)
    return F.cross_entropy(logits, targets, reduction="sum"), len(feature.response_ids)


def fused_prefix(projectors: ProjectorSet, feature: Feature) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per receiver block, the prompt cache with the fused entries in place (differentiable)."""
    positions = feature.positions
    keys, values = [], []
    for block, sharer_block in enumerate(projectors.sharer_block_of):
        own_key, own_value = feature.receiver_keys[block].float(), feature.receiver_values[block].float()
        sharer_key, sharer_value = (tensor.float() for tensor in feature.sharer[sharer_block])
        fused_key, fused_value = projectors.fuse(
            block, own_key[:, positions], own_value[:, positions], sharer_key, sharer_value
        )
        keys.append(own_key.index_copy(1, positions, fused_key))
        values.append(own_value.index_copy(1, positions, fused_value))
    return keys, values


def logits_over_prefix(
    split: SplitModel, keys: list[torch.Tensor], values: list[torch.Tensor], tokens: list[int]
) -> torch.Tensor:
    """The receiver's float32 logits for ``tokens`` placed right after a given per-block cache of
    the prompt, gradients flowing into that cache (the model's own weights stay frozen)."""
    start = keys[0].shape[1]
    with torch.no_grad():
        hidden = split.decoder.embed_tokens(torch.tensor([tokens], device=split.device))
    positions = torch.arange(start, start + len(tokens), device=split.device)[None]
    step = _PrefixAttention(keys, values)
    with federated_attention_enabled(split.model):
        for block in range(split.num_blocks):
            hidden = split.block(block, hidden, positions, step)
    return split.model.lm_head(split.decoder.norm(hidden[0])).float()


class _PrefixAttention:
    """The hook's view when new tokens follow a given cache: they see all of it and, among
    themselves, what precedes them."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values

    def attend(self, layer, key, value, query=None, scaling=None):
        prefix = self.keys[layer].shape[1]
        count = key.shape[2]
        keys = torch.cat([self.keys[layer][None].to(key.dtype), key], dim=2)
        values = torch.cat([self.values[layer][None].to(value.dtype), value], dim=2)
        mask = torch.ones(count, prefix + count, dtype=torch.bool, device=key.device)
        mask[:, prefix:] = torch.tril(mask[:, prefix:])
        return keys, values, mask[None, None]


def held_out_loss(split: SplitModel, projectors: ProjectorSet, paths: list[Path]) -> float:
    """Mean cross-entropy per response token over ``paths``, hard gates and no dropout (as served)."""
    mode = projectors.training
    projectors.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for path in paths:
            loss, tokens = example_loss(split, projectors, read_feature(path))
            total, count = total + float(loss), count + tokens
    projectors.train(mode)
    return total / max(count, 1)


@dataclass
class _State:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    directory: Path,
    receiver: LoadedModel,
    sharer: LoadedModel,
    examples: dict[str, list[Example]],
    config: TrainingConfig,
    quiet: bool = False,
    stop_after: int | None = None,
) -> ProjectorSet:
    """Train (or resume training) the pair's projectors in ``directory``; ``examples`` has a
    'train' and a 'held_out' list. ``stop_after`` ends this call after that many steps in total
    (the run resumes from its checkpoint later, as after an interruption)."""
    if not examples.get("train") or not examples.get("held_out"):
        raise FedAttnError("training needs training examples and held-out examples")
    for model in (receiver.model, sharer.model):
        model.requires_grad_(False)
    _check_folder(directory, config)
    caching = time.perf_counter()
    paths = precompute(directory, receiver, sharer, examples, config, quiet)
    _add_seconds(directory / FEATURES / "seconds.json", time.perf_counter() - caching)
    split = SplitModel(receiver.model)
    steps_per_epoch = math.ceil(len(paths["train"]) / config.batch)
    total_steps = steps_per_epoch * config.epochs
    info = ProjectorInfo(
        receiver.name,
        sharer.name,
        pair_dims(cache_dims(receiver.model), cache_dims(sharer.model)),
        replace(config.shape, anneal_steps=total_steps),
    )
    torch.manual_seed(config.seed)
    projectors = ProjectorSet(info).train()
    optimizer = torch.optim.AdamW(projectors.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _rate(step, warmup, total_steps))
    state = _resume(directory, projectors, optimizer, schedule) or _start(directory, split, projectors, paths)
    started = time.perf_counter() - (state.history[-1].get("elapsed_s", 0.0) if state.history else 0.0)
    last = total_steps if stop_after is None else min(total_steps, stop_after)
    with progress_bar("training projectors (steps)", total_steps, completed=state.step, quiet=quiet) as advance:
        while state.step < last:
            projectors.anneal(state.step)
            train_loss = _step(split, projectors, optimizer, schedule, paths["train"], state.step, config)
            state.step += 1
            record: dict[str, Any] = {"step": state.step, "train_loss": train_loss, "lr": schedule.get_last_lr()[0]}
            record["temperature"] = projectors.temperature
            if state.step % config.eval_every == 0 or state.step == total_steps:
                record["held_out_loss"] = held_out_loss(split, projectors, paths["held_out"])
                record["open_gates"] = projectors.open_gates()
                if not quiet:
                    _console.print(
                        f"step {state.step}/{total_steps}: held-out loss {record['held_out_loss']:.4f} "
                        f"({record['open_gates']} of {2 * len(projectors.blocks)} gates open)"
                    )
            record["elapsed_s"] = time.perf_counter() - started
            state.history.append(record)
            _append_log(directory, record)
            _checkpoint(directory, projectors, optimizer, schedule, state)
            advance()
    if state.step == total_steps:
        _finish(directory, projectors, config, state, len(paths["train"]), len(paths["held_out"]))
    return projectors.eval()


def _rate(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the peak rate, then linear decay to zero at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _step(split, projectors, optimizer, schedule, paths: list[Path], step: int, config: TrainingConfig) -> float:
    """One optimiser step over the next batch of this epoch's seeded order; its mean token loss."""
    batch = _batch(len(paths), step, config)
    features = [read_feature(paths[index]) for index in batch]
    tokens = sum(len(feature.response_ids) for feature in features)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for feature in features:
        loss, _ = example_loss(split, projectors, feature)
        (loss / tokens).backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(projectors.parameters(), config.clip)
    optimizer.step()
    schedule.step()
    return total / tokens


def _batch(count: int, step: int, config: TrainingConfig) -> list[int]:
    per_epoch = math.ceil(count / config.batch)
    epoch, within = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    return order[within * config.batch : (within + 1) * config.batch]


def _start(directory: Path, split: SplitModel, projectors: ProjectorSet, paths: dict[str, list[Path]]) -> _State:
    """A fresh run: its first record is the held-out loss of the closed projectors, which is the
    receiver alone (every gate starts shut)."""
    record = {"step": 0, "held_out_loss": held_out_loss(split, projectors, paths["held_out"]), "open_gates": 0}
    (directory / LOG_FILE).write_text(json.dumps(record) + "\n")
    return _State(0, [record])


def _append_log(directory: Path, record: dict[str, Any]) -> None:
    with (directory / LOG_FILE).open("a") as log:
        log.write(json.dumps(record) + "\n")


def _checkpoint(directory: Path, projectors, optimizer, schedule, state: _State) -> None:
    saved = {
        "projectors": projectors.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "step": state.step,
        "rng": torch.get_rng_state(),
        "temperature": projectors.temperature,
    }
    _write_atomic(directory / CHECKPOINT_FILE, lambda target: torch.save(saved, target))


def _resume(directory: Path, projectors, optimizer, schedule) -> _State | None:
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        projectors.load_state_dict(saved["projectors"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["rng"])
        projectors.temperature = float(saved["temperature"])
        step = int(saved["step"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, EOFError, pickle.UnpicklingError) as error:
        # torch's and load_state_dict's messages run over many lines: their first says what is wrong
        reason = str(error).strip().split("\n", 1)[0] or type(error).__name__
        raise FedAttnError(f"{path} is not a checkpoint of this training ({reason}); remove it to start over") from None
    history = _history(directory / LOG_FILE, step)
    (directory / LOG_FILE).write_text("".join(json.dumps(record) + "\n" for record in history))
    return _State(step, history)


def _history(path: Path, step: int) -> list[dict[str, Any]]:
    """The log's records up to the checkpoint's ``step`` (later steps are redone). A last line cut
    short is a run killed while appending it, before its checkpoint: dropped; any other unreadable
    line is refused, since the records hold the run's held-out losses."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise FedAttnError(f"cannot read {path}, the run's log: {error}") from None
    history = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError as error:
            if number == len(lines):
                break
            raise FedAttnError(f"{path}:{number} is not a record of this training ({error})") from None
        if record["step"] <= step:
            history.append(record)
    return history


def _check_folder(directory: Path, config: TrainingConfig) -> None:
    """A folder holds one training: resuming with another configuration is refused."""
    directory.mkdir(parents=True, exist_ok=True)
    stored = directory / "training.json"
    described = json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n"
    if stored.exists() and stored.read_text() != described:
        raise FedAttnError(f"{directory} holds a training of another configuration; use a new --out folder")
    stored.write_text(described)


def _finish(directory: Path, projectors: ProjectorSet, config: TrainingConfig, state: _State, train: int, held: int):
    evaluated = [record for record in state.history if "held_out_loss" in record]
    projectors.info.training = {
        **config.to_json(),
        "steps": state.step,
        "train_examples": train,
        "held_out_examples": held,
        "held_out_loss": {"receiver_alone": evaluated[0]["held_out_loss"], "final": evaluated[-1]["held_out_loss"]},
        "train_seconds": state.history[-1].get("elapsed_s", 0.0),
        "features_seconds": _add_seconds(directory / FEATURES / "seconds.json", 0.0),
        "open_gates": projectors.open_gates(),
    }
    projectors.eval().save(directory)


def _add_seconds(path: Path, seconds: float) -> float:
    """The features' total computing time over every call that computed some."""
    total = (json.loads(path.read_text())["seconds"] if path.exists() else 0.0) + seconds
    path.write_text(json.dumps({"seconds": total}) + "\n")
    return total


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
