"""What each ``--kv-codec`` costs and changes, on the real model and one real prompt.

Qwen2.5-Coder-0.5B-Instruct in bfloat16 on the CPU, the 4-shot GSM8K prompt of test item 0
(~540 tokens). Per codec:
- bytes per token per sync block: the payload for the whole prompt divided by its tokens (the
  per-channel key scales of the KIVI codecs are amortized over the frame);
- relative reconstruction error ||x - x'|| / ||x|| of K and of V, median over a few blocks, on
  the prompt's K/V captured from one centralized prefill (one party, no exchange);
- whether a 3-party publisher-dense run (TokEx split, greedy, 32 new tokens, no early stop)
  gives the same tokens as with float32 / bfloat16 on the wire, and how many leading tokens agree.

    python bench/kv_codecs.py            # about 2-3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedattn.evaluation.tasks import gsm8k
from fedattn.network.kv_codec import CODECS
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.runtime.batch_decode import decode_rows
from fedattn.runtime.decoding import StopRule
from fedattn.runtime.dims import ModelDims
from fedattn.runtime.models import DEFAULT_MODEL, load_model
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import _prefill
from fedattn.systems.fedattn.schedule import Schedule, all_layers
from fedattn.systems.fedattn.splits import split_prompt

BLOCKS = (0, 5, 11, 17, 23)


def prompt_segments(tokenizer, shots: int, parties: int) -> list[list[int]]:
    prompt = gsm8k.few_shot_prompt(0, shots)
    return split_prompt(tokenizer, prompt.exemplars, prompt.question, "TokEx", parties)


def captured_kv(model, ids: list[int], blocks: tuple[int, ...]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Block -> (K, V), each (KV heads, tokens, head dim): one party's prefill over all of ``ids``."""
    config = RunConfig(Schedule(model.config.num_hidden_layers, ()), max_new_tokens=1)
    with federated_attention_enabled(model):
        [party], _, _ = _prefill(model, [ids], config, StopRule(), "")
    return {block: tuple(t.clone() for t in party.store[block].view()[:2]) for block in blocks}


def publisher_answers(
    model, segments: list[list[int]], configs: dict[str, RunConfig], new_tokens: int
) -> dict[str, list[int]]:
    """The publisher's greedy tokens under each configuration: a federated prefill each, then
    every answer decoded in one batch (decoding needs no messages, so the codec plays no part)."""
    rows = {}
    with federated_attention_enabled(model):
        for name, config in configs.items():
            parties, _, _ = _prefill(model, segments, config, StopRule(), "")
            publisher = parties[-1]
            publisher.first_token()
            rows[name] = publisher.decode_row()
        tokens = decode_rows(model, list(rows.values()), new_tokens)
    return dict(zip(rows, tokens))


def relative_error(original: torch.Tensor, decoded: torch.Tensor) -> float:
    original = original.float()
    return float((original - decoded.float()).norm() / original.norm())


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaded = load_model(args.model, device="cpu", dtype=torch.bfloat16, progress=False)
    model = loaded.model
    segments = prompt_segments(loaded.tokenizer, args.shots, parties=3)
    prompt = [token for segment in segments for token in segment]
    heads = model.config.num_key_value_heads
    head_dim = ModelDims.from_config(model.config).head_dim
    blocks = tuple(block for block in BLOCKS if block < model.config.num_hidden_layers)
    kv = captured_kv(model, prompt, blocks)
    schedule = Schedule(model.config.num_hidden_layers, (), publisher_layers=all_layers(model.config.num_hidden_layers))

    rows = []
    for name, codec in CODECS.items():
        key_errors, value_errors = [], []
        for key, value in kv.values():
            decoded_key, decoded_value = codec.decode(memoryview(codec.encode(key, value)), tuple(key.shape))
            key_errors.append(relative_error(key, decoded_key))
            value_errors.append(relative_error(value, decoded_value))
        rows.append(
            (
                name,
                codec.payload_size(len(prompt), heads, head_dim) / len(prompt),
                statistics.median(key_errors),
                statistics.median(value_errors),
            )
        )
    configs = {name: RunConfig(schedule, codec=codec, max_new_tokens=args.new_tokens) for name, codec in CODECS.items()}
    answers = publisher_answers(model, segments, configs, args.new_tokens)

    print(
        f"{loaded.name} (bfloat16, CPU), {args.shots}-shot GSM8K test item 0: {len(prompt)} tokens, "
        f"TokEx segments {[len(s) for s in segments]}; K/V errors: median over blocks {list(blocks)}; "
        f"answers: 3 parties, publisher-dense, greedy, {args.new_tokens} new tokens"
    )
    print(
        "| codec | bytes/token/sync block | rel. error K | rel. error V | = float32 answer | = bfloat16 answer "
        "| tokens agreeing with float32 |"
    )
    print("|---|---:|---:|---:|:---:|:---:|---:|")
    for name, per_token, key_error, value_error in rows:
        same32 = "yes" if answers[name] == answers["float32"] else "no"
        same16 = "yes" if answers[name] == answers["bfloat16"] else "no"
        agree = agreeing_prefix(answers[name], answers["float32"])
        print(
            f"| {name} | {per_token:.1f} | {key_error:.2e} | {value_error:.2e} | {same32} | {same16} "
            f"| {agree}/{len(answers['float32'])} |"
        )
    print(f"float32 answer: {loaded.tokenizer.decode(answers['float32'])!r}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
