"""Engine prefill and decode against HF on the same ids, one run, side by side.

Qwen2.5-Coder-0.5B-Instruct (default), N = 4, a ~600-token 4-shot GSM8K prompt split TokEx-style
(parties 1..3 cut the exemplars evenly by tokens, the publisher holds only the question):
- prefill: the whole federated prefill (every party, in-process) at H = 1 and H = 8 against one
  centralized HF forward over the concatenated ids (SDPA, with its KV cache);
- decode: the publisher's tokens/s against HF ``generate`` (greedy, same length, HF's prefill
  subtracted);
- memory: peak resident memory of the runs next to the model's parameter bytes.
Medians over --repeats, runs interleaved so machine noise hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedattn.evaluation.tasks import gsm8k
from fedattn.runtime.models import DEFAULT_MODEL, load_model
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import run_in_process
from fedattn.systems.fedattn.schedule import Schedule, every


def tokex_segments(tokenizer, parties: int, shots: int, item: int) -> list[list[int]]:
    prompt = gsm8k.few_shot_prompt(item, shots)
    ids = tokenizer(gsm8k.SEPARATOR.join(prompt.exemplars), add_special_tokens=False).input_ids
    cuts = [round(i * len(ids) / (parties - 1)) for i in range(parties)]
    segments = [ids[cuts[i] : cuts[i + 1]] for i in range(parties - 1)]
    return segments + [tokenizer(prompt.question, add_special_tokens=False).input_ids]


def hf_prefill_s(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def separate_forwards_s(model, segments: list[list[int]]) -> float:
    """The floor of any per-party prefill: N independent HF forwards, local attention only."""
    start, offset = time.perf_counter(), 0
    with torch.inference_mode():
        for segment in segments:
            positions = torch.arange(offset, offset + len(segment)).unsqueeze(0)
            model.base_model(input_ids=torch.tensor([segment]), position_ids=positions, use_cache=True)
            offset += len(segment)
    return time.perf_counter() - start


def hf_generate_s(model, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--parties", type=int, default=4)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--item", type=int, default=0, help="GSM8K test item used as the question")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    segments = tokex_segments(tokenizer, args.parties, args.shots, args.item)
    ids = torch.tensor([sum(segments, [])])
    layers = model.config.num_hidden_layers
    print(
        f"{args.model}: {layers} blocks, prompt {ids.shape[1]} tokens in {[len(s) for s in segments]}, "
        f"{args.threads} threads, {args.repeats} repeats, {args.new_tokens} new tokens"
    )

    configs = {h: RunConfig(Schedule(layers, every(h, layers)), max_new_tokens=1) for h in (1, 8)}
    decode_config = RunConfig(Schedule(layers, every(1, layers)), max_new_tokens=args.new_tokens)
    # warm-up: first calls pay one-time allocation and kernel selection
    hf_prefill_s(model, ids)
    run_in_process(model, segments, configs[1])
    reset_peak_rss()
    rss_before = rss_mb("VmRSS")

    times: dict[str, list[float]] = {
        "hf_prefill": [],
        "separate_forwards": [],
        "fed_prefill_h1": [],
        "fed_prefill_h8": [],
        "hf_decode_tps": [],
        "fed_decode_tps": [],
    }
    same_tokens = True
    for _ in range(args.repeats):
        times["hf_prefill"].append(hf_prefill_s(model, ids))
        times["separate_forwards"].append(separate_forwards_s(model, segments))
        for h, config in configs.items():
            times[f"fed_prefill_h{h}"].append(run_in_process(model, segments, config).prefill_s)
        result = run_in_process(model, segments, decode_config)  # no stop tokens: always new_tokens long
        times["fed_decode_tps"].append(result.decode_tokens_per_s)
        hf_decode = hf_generate_s(model, ids, args.new_tokens) - statistics.median(times["hf_prefill"])
        times["hf_decode_tps"].append((args.new_tokens - 1) / hf_decode)
        with torch.inference_mode():
            reference = model.generate(
                ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            )
        same_tokens &= reference[0, ids.shape[1] :].tolist() == result.answer_token_ids
    peak_mb = rss_mb("VmHWM")

    med = {key: statistics.median(values) for key, values in times.items()}
    rows = [
        ("prefill, HF centralized (s)", med["hf_prefill"], 1.0, ""),
        (
            f"prefill, {args.parties} plain HF forwards (s)",
            med["separate_forwards"],
            med["separate_forwards"] / med["hf_prefill"],
            "floor: no exchange",
        ),
        (
            "prefill, FedAttn H=1 (s)",
            med["fed_prefill_h1"],
            med["fed_prefill_h1"] / med["hf_prefill"],
            "target <= 1.15x",
        ),
        ("prefill, FedAttn H=8 (s)", med["fed_prefill_h8"], med["fed_prefill_h8"] / med["hf_prefill"], "target < H=1"),
        ("decode, HF generate (tok/s)", med["hf_decode_tps"], 1.0, ""),
        (
            "decode, FedAttn publisher (tok/s)",
            med["fed_decode_tps"],
            med["fed_decode_tps"] / med["hf_decode_tps"],
            "target >= 0.9x",
        ),
    ]
    print(f"{'measure':38} {'median':>10} {'ratio':>8}")
    for name, value, ratio, note in rows:
        print(f"{name:38} {value:10.3f} {ratio:7.2f}x  {note}")
    print(f"H=1 decode tokens identical to HF generate: {same_tokens}")
    print(
        f"memory: parameters {param_mb:.0f} MiB; resident before runs {rss_before:.0f} MiB, "
        f"peak during runs {peak_mb:.0f} MiB "
        f"(+{peak_mb - rss_before:.0f} MiB over the loaded model)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "medians": med,
                    "samples": times,
                    "same_tokens": same_tokens,
                    "param_mib": param_mb,
                    "rss_before_mib": rss_before,
                    "peak_mib": peak_mb,
                    "segments": [len(s) for s in segments],
                    "model": args.model,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
