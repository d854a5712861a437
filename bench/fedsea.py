"""FedSEA split inference: how much one server gains by batching its clients' steps, and what the
split costs a client against running the whole model itself.

Part 1, server throughput. N clients (GSM8K test questions 0..N-1 as chat prompts, one each, the
same cut) are answered by one server in one in-process run (``run_in_process`` with N queries:
each round every pending step goes through the server's blocks in one call), against the same N
queries answered one at a time (N solo runs). Printed per N: aggregate new tokens per second of
the whole run (every party in this process, one after another) and per second of the server's
own compute (``Server.compute_s``: what a server machine would spend), batched and one at a time
side by side, their ratio, and whether the batched answers are the solo answers token for token.

Part 2, one client against centralized inference. The client's share of the model
(``runtime.blocks.client_share``: parameters, per-token matrix products, KV cache) beside its
measured share of the compute seconds of a solo run, and the per-token latency of the split (one
client, every party in this process: no network) against the same model's plain incremental
decoding (``runtime.incremental.IncrementalLM``: prefill, then one token per forward).

Greedy, no stop rule (every answer has --max-new-tokens tokens, so runs compare like with like),
float32 hidden states on the wire. Medians over --repeats, the two sides of each comparison
interleaved so that machine noise hits both alike.

    python bench/fedsea.py                                        # tiny-random, seconds
    python bench/fedsea.py --model qwen2.5-coder-0.5b-instruct --dtype bfloat16 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks import gsm8k
from fedattn.runtime.blocks import RowStep, SplitModel
from fedattn.runtime.decoding import Decoding, StopRule
from fedattn.runtime.incremental import IncrementalLM
from fedattn.runtime.models import load_model
from fedattn.systems.fedsea.config import DEFAULT_CLIENT_BLOCKS, Noise, SplitConfig, client_blocks
from fedattn.systems.fedsea.inprocess import ClientQuery, run_in_process
from fedattn.systems.fedsea.query import SplitSetup, chat_prompt

CLIENT_COUNTS = (1, 4, 8)


class ServerClock:
    """``SplitModel.run`` unchanged, timing the server's calls (rows starting at block A; the
    client's start at 0 or L - C) apart: decode steps (one token a row) and the rest (prefills)."""

    def __init__(self, split: SplitModel, first: int) -> None:
        self.run, self.first = split.run, first
        self.decode_s = self.prefill_s = 0.0
        split.run = self

    def __call__(self, rows: list[RowStep]) -> list[torch.Tensor]:
        start = time.perf_counter()
        outputs = self.run(rows)
        if rows and rows[0].first == self.first:
            spent = time.perf_counter() - start
            if all(row.hidden.shape[0] == 1 for row in rows):
                self.decode_s += spent
            else:
                self.prefill_s += spent
        return outputs


def throughput(setup: SplitSetup, prompts: list[list[int]], repeats: int) -> None:
    """Part 1: per client count, batched against one at a time."""
    split, identity = setup.split, setup.loaded.identity
    clock = ServerClock(split, setup.config.first)

    def answered(queries: list[ClientQuery], batched: bool) -> tuple[list[list[int]], dict[str, float]]:
        """Every answer and the seconds of the run, of the server's compute and of its decode steps."""
        clock.decode_s = clock.prefill_s = 0.0
        if batched:
            results = [run_in_process(split, identity, queries)]
        else:
            results = [run_in_process(split, identity, [query]) for query in queries]
        answers = [client.answer for result in results for client in result.clients]
        wall = sum(result.wall_s for result in results)
        return answers, {"run": wall, "server": clock.decode_s + clock.prefill_s, "decode": clock.decode_s}

    sides = f"{'one at a time':>13} {'batched':>8} {'ratio':>6}"
    print(
        f"{'clients':>7} | {'tokens/s of the run':^29} | {'tokens/s of server compute':^29} | "
        f"{'tokens/s of server decode steps':^29} | same answers"
    )
    print(f"{'':>7} | {sides} | {sides} | {sides} |")
    for count in CLIENT_COUNTS:
        queries = [ClientQuery(prompt, setup.config, StopRule()) for prompt in prompts[:count]]
        seconds: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        answers: dict[bool, list[list[int]]] = {}
        for _ in range(repeats):
            for batched in (False, True):
                answers[batched], spent = answered(queries, batched)
                seconds[batched].append(spent)
        tokens = sum(len(answer) for answer in answers[True])
        decode_tokens = tokens - count  # each answer's first token comes from its prefill
        cells = []
        for measure, counted in (("run", tokens), ("server", tokens), ("decode", decode_tokens)):
            solo, batched = (counted / statistics.median(s[measure] for s in seconds[side]) for side in (False, True))
            cells.append(f"{solo:>13.1f} {batched:>8.1f} {batched / solo:>5.2f}x")
        same = sum(one == other for one, other in zip(answers[False], answers[True], strict=True))
        print(f"{count:>7} | {' | '.join(cells)} | {same}/{count}")
    split.run = clock.run


def centralized(model: torch.nn.Module, prompt: list[int], count: int) -> tuple[float, float, list[int]]:
    """Plain incremental greedy decoding: (seconds to the first token, mean seconds per later token, answer)."""
    language_model = IncrementalLM(model)
    sequence = list(prompt)
    times = []
    start = time.perf_counter()
    for _ in range(count):
        sequence.append(int(torch.argmax(language_model.next_token_logits(sequence, 1)[-1])))
        times.append(time.perf_counter())
    per_token = (times[-1] - times[0]) / (count - 1) if count > 1 else 0.0
    return times[0] - start, per_token, sequence[len(prompt) :]


def against_centralized(setup: SplitSetup, prompt: list[int], repeats: int) -> None:
    """Part 2: the client's share and per-token latency against the whole model run locally."""
    split, identity, config = setup.split, setup.loaded.identity, setup.config
    share = setup.share()
    split_first, split_per, local_first, local_per, client_seconds = [], [], [], [], []
    for _ in range(repeats):
        result = run_in_process(split, identity, [ClientQuery(prompt, config, StopRule())])
        (client,) = result.clients
        timing = client.timing()
        split_first.append(timing["prefill_s"])
        split_per.append(timing["per_token_s"])
        client_seconds.append(client.compute_s / (client.compute_s + result.server.compute_s))
        first, per_token, local_answer = centralized(setup.loaded.model, prompt, config.max_new_tokens)
        local_first.append(first)
        local_per.append(per_token)
    median = statistics.median
    first, last = config.client_blocks
    print(
        f"client A,C = {first},{last} of {split.num_blocks} blocks (the server runs {split.num_blocks - first - last})"
    )
    print(
        f"  client's share: parameters {share['memory']:.1%}, per-token matrix products {share['compute']:.1%}, "
        f"KV cache {share['kv_cache']:.1%}; measured compute seconds {median(client_seconds):.1%}"
    )
    print(f"  {'':<28}{'first token (s)':>16}{'per later token (ms)':>22}")
    print(f"  {'split (one client, no link)':<28}{median(split_first):>16.4f}{1000 * median(split_per):>22.2f}")
    print(f"  {'centralized incremental':<28}{median(local_first):>16.4f}{1000 * median(local_per):>22.2f}")
    print(
        f"  split / centralized per token: {median(split_per) / median(local_per):.2f}x; "
        f"same answer: {'yes' if client.answer == local_answer else 'no'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--client-blocks", type=client_blocks, default=DEFAULT_CLIENT_BLOCKS, metavar="A,C")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: more only contend)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, dtype=getattr(torch, args.dtype), progress=False)
    config = SplitConfig(args.client_blocks, Noise(), Noise(), "float32", Decoding(), args.max_new_tokens)
    setup = SplitSetup(config, loaded, "cpu", args.dtype)
    prompts = [chat_prompt(setup, gsm8k.load("test")[index].question) for index in range(max(CLIENT_COUNTS))]
    print(
        f"{args.model} ({args.dtype}), A,C = {args.client_blocks[0]},{args.client_blocks[1]}, "
        f"{args.max_new_tokens} new tokens a client, GSM8K test questions 0..{max(CLIENT_COUNTS) - 1} "
        f"({min(map(len, prompts))}-{max(map(len, prompts))} prompt tokens), greedy, "
        f"medians of {args.repeats}, {torch.get_num_threads()} threads"
    )
    throughput(setup, prompts, args.repeats)
    print()
    against_centralized(setup, prompts[0], args.repeats)


if __name__ == "__main__":
    try:
        main()
    except FedAttnError as error:
        print(f"fedsea.py: error: {error}", file=sys.stderr)
        sys.exit(2)
