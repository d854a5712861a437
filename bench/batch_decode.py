"""Batched decoding across problems against one problem at a time, on the same problems, one run.

The evaluation harness prefills each GSM8K problem on its own and then decodes the answers of
``--batch-size`` problems together (``engine.run_many_in_process``). This prints, for the same
problems and schedule, the decoding throughput (new tokens per second of decoding wall time) of
batch size 1 and of the batch, their ratio, and how many answers are token-for-token identical.
Defaults: Qwen2.5-Coder-0.5B-Instruct in bfloat16, N = 4 TokEx with H = 4, 4-shot prompts, 16
problems, 64 new tokens (greedy; no stop rule, so every answer has the same length and the
throughput compares like with like). Medians over --repeats of each side, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedattn.evaluation.tasks import gsm8k
from fedattn.runtime.models import DEFAULT_MODEL, load_model
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import run_many_in_process
from fedattn.systems.fedattn.schedule import Schedule, every
from fedattn.systems.fedattn.splits import split_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--parties", type=int, default=4)
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu", dtype=getattr(torch, args.dtype), progress=False)
    layers = loaded.model.config.num_hidden_layers
    config = RunConfig(Schedule(layers, every(args.sync_every, layers)), max_new_tokens=args.max_new_tokens)
    prompts = [gsm8k.few_shot_prompt(index, 4) for index in range(args.problems)]
    queries = [
        split_prompt(loaded.tokenizer, prompt.exemplars, prompt.question, "TokEx", args.parties) for prompt in prompts
    ]

    def decode(batch_size: int) -> tuple[float, list[list[int]]]:
        """Seconds of decoding (prefill excluded) and every answer, in problem order."""
        seconds, answers = 0.0, []
        for first in range(0, len(queries), batch_size):
            results = run_many_in_process(loaded.model, queries[first : first + batch_size], config)
            seconds += sum(result.decode_s for result in results)
            answers += [result.answer_token_ids for result in results]
        return seconds, answers

    timings: dict[int, list[float]] = {1: [], args.batch_size: []}
    answers: dict[int, list[list[int]]] = {}
    for _ in range(args.repeats):
        for size in timings:
            start = time.perf_counter()
            seconds, answers[size] = decode(size)
            timings[size].append(seconds)
            print(
                f"  batch {size}: {seconds:.1f} s decoding ({time.perf_counter() - start:.1f} s with prefill)",
                flush=True,
            )
    tokens = sum(len(answer) - 1 for answer in answers[1])
    single, batched = (statistics.median(timings[size]) for size in timings)
    same = sum(a == b for a, b in zip(answers[1], answers[args.batch_size]))
    print(
        f"{args.model} ({args.dtype}), {args.problems} GSM8K problems, N = {args.parties} TokEx, "
        f"H = {args.sync_every}, "
        f"{args.max_new_tokens} new tokens, {torch.get_num_threads()} threads"
    )
    print(f"{'decoding':<22}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'one at a time':<22}{single:>10.1f}{tokens / single:>12.1f}")
    print(f"{f'batch of {args.batch_size}':<22}{batched:>10.1f}{tokens / batched:>12.1f}")
    print(f"speed-up {single / batched:.2f}x; identical answers {same}/{len(queries)}")


if __name__ == "__main__":
    main()
