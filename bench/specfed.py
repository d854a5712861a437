"""SpecFed against its baselines: speculative vs one-token-per-round ensemble decoding, top-K vs full
distributions, in process and over a modelled link.

Every cell is one in-process query (``fedattn.systems.specfed.query.answer``) on the models loaded
once; a cell changes only the configuration (``dataclasses.replace``). Cells run interleaved, the
one-token-per-round baselines (gamma 0) among the speculative ones, prompt after prompt and repeat
after repeat, so that the machine's noise hits both alike; figures are medians over prompts and
repeats, speed-ups the medians of each prompt's ratio to its own baseline.

Time is taken three ways: ``wall_s`` (the whole query in this process, every party one after
another, prompt prefill included), the critical path ``parallel_s`` (per round the draft, the
slowest worker, the decision: the workers verifying at once), and the decode phase alone (from the
start of round 2 to the answer, wall: round 1 holds every model's prefill of the prompt, which on
a CPU is most of a short answer's time). Round 2's start is when the server asks its drafter for
round 2's drafts (``RoundClock`` wraps the drafter; it changes nothing it proposes).

The link is a model, not a measurement (this kernel has no netem, so ``bench/network.py`` cannot
delay packets): per round one round trip (the drafts down, the records up; the verdict rides with
the next drafts) and the bytes over the bandwidth of the server's link, which carries every
worker's records (as the server's veth does in the namespaces), so
link_s = (rounds + 1) * RTT + (server's bytes sent + all workers' bytes sent) / bandwidth
(the + 1 is the hello exchange), and the modelled query takes parallel_s + link_s.

    python bench/specfed.py --models tiny                    # seconds: the same bench on tiny models
    python bench/specfed.py --out specfed.json               # Qwen2.5-Coder 1.5B + 0.5B, see README.md
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedattn.evaluation.tasks import gsm8k
from fedattn.systems.specfed.config import LOOKUP_DRAFT, SpecFedConfig, WorkerSpec
from fedattn.systems.specfed.drafts import Drafter
from fedattn.systems.specfed.query import SpecFedSetup, answer, load_setup, plain_prompt
from fedattn.systems.specfed.reporting import FULL_DISTRIBUTIONS

MODELS = {  # workers (equal weights), draft model
    "real": (("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"), "qwen2.5-coder-0.5b-instruct"),
    "tiny": (("tiny-random", "tiny-random-wide"), "tiny-random-draft"),
}
ONE_PERCENT_K = 1517  # about 1% of Qwen's 151,665 real tokens
TINY_K = 16  # a few percent of the tiny models' vocabulary
MODEL_DRAFT = "model"
LINK_MODEL = "link_s = (rounds + 1) * RTT + (server bytes sent + all workers' bytes sent) / rate"
LINKS = [  # (label, Mbit/s, RTT ms)
    ("100 Mbit/s, 20 ms", 100, 20.0),
    ("100 Mbit/s, 100 ms", 100, 100.0),
    ("20 Mbit/s, 20 ms", 20, 20.0),
    ("20 Mbit/s, 100 ms", 20, 100.0),
]


@dataclass(frozen=True)
class Cell:
    gamma: int
    draft: str  # MODEL_DRAFT or LOOKUP_DRAFT (gamma 0 drafts nothing: lookup, so no draft model runs)
    top_k: int | None  # None: full distributions

    @property
    def k_label(self) -> str:
        return "all" if self.top_k is None else str(self.top_k)

    @property
    def name(self) -> str:
        rounds = "gamma 0" if self.gamma == 0 else f"gamma {self.gamma} {self.draft}"
        return f"{rounds}, K={self.k_label}"

    @property
    def baseline(self) -> Cell:
        return Cell(0, LOOKUP_DRAFT, self.top_k)


def cell_order(gammas: list[int], drafts: list[str], top_ks: list[int | None], every: int) -> list[Cell]:
    """Per K: the baseline, then the speculative cells with the baseline again after every ``every``
    of them (0: only first; its repeated runs are one median), so baseline and speculative runs alternate."""
    order: list[Cell] = []
    for top_k in top_ks:
        speculative = [Cell(gamma, draft, top_k) for gamma in gammas for draft in drafts]
        order.append(Cell(0, LOOKUP_DRAFT, top_k))
        step = every or len(speculative)
        for index in range(0, len(speculative), step):
            order += speculative[index : index + step] + ([Cell(0, LOOKUP_DRAFT, top_k)] if every else [])
    return order


class RoundClock:
    """The server's drafter, unchanged, noting when each round asks for drafts and how long the
    sequence was then (so round 1's emitted tokens are known)."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.calls: list[tuple[float, int]] = []

    def propose(
        self, sequence: list[int], count: int, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor]:
        self.calls.append((time.perf_counter(), len(sequence)))
        return self.drafter.propose(sequence, count, generator)


@dataclass
class ClockedSetup(SpecFedSetup):
    """The setup whose drafter is wrapped in a ``RoundClock`` (the last one made is ``clock``)."""

    clock: RoundClock | None = None

    def drafter(self) -> Drafter:
        self.clock = RoundClock(super().drafter())
        return self.clock


def run_cell(setup: ClockedSetup, base: SpecFedConfig, cell: Cell, prompt: list[int]) -> dict:
    config = dataclasses.replace(
        base, gamma=cell.gamma, top_k=cell.top_k, draft=base.draft if cell.draft == MODEL_DRAFT else LOOKUP_DRAFT
    )
    setup.config = config
    report = answer(setup, prompt, ())
    end = time.perf_counter()
    document = report.to_json()
    tokens = len(document["answer_token_ids"])
    calls = setup.clock.calls
    decode = None
    if len(calls) >= 2:
        decode = {"seconds": end - calls[1][0], "tokens": len(prompt) + tokens - calls[1][1]}
    server, *_ = [party for party in document["parties"] if party["role"] == "server"]
    workers = [party for party in document["parties"] if party["role"] == "worker"]
    return {
        "cell": cell.name,
        "gamma": cell.gamma,
        "draft": cell.draft,
        "top_k": cell.k_label,
        "prompt_tokens": len(prompt),
        "answer_token_ids": document["answer_token_ids"],
        "answer": document["answer"],
        "tokens": tokens,
        "rounds": document["rounds"],
        "acceptance_rate": document["acceptance_rate"],
        "tokens_per_round": document["tokens_per_round"],
        "bytes_per_token": document["bytes_per_token"],
        "bytes_sent": {"server": server["bytes_sent"], "workers": [worker["bytes_sent"] for worker in workers]},
        "full_distribution_bytes": document["baselines"][FULL_DISTRIBUTIONS],
        "measured_equals_expected": document["measured_bytes"] == document["expected_bytes"],
        "aggregation_bias": document["aggregation_bias"],
        "wall_s": document["timing"]["wall_s"],
        "parallel_s": document["timing"]["parallel_s"],
        "decode_phase": decode,
    }


def bytes_on_link(run: dict) -> int:
    """What the server's link carries: everything it sends and every worker's records."""
    return run["bytes_sent"]["server"] + sum(run["bytes_sent"]["workers"])


def link_seconds(run: dict, mbit_s: float, rtt_ms: float) -> float:
    """The module doc's link model: a round trip per round and the hellos, the bytes over the rate."""
    return (run["rounds"] + 1) * rtt_ms / 1000 + bytes_on_link(run) * 8 / (mbit_s * 1e6)


def derived(run: dict) -> dict:
    """Per-run figures the tables compare (tokens per second three ways, and over each modelled link)."""
    figures = {
        "wall_tps": run["tokens"] / run["wall_s"],
        "parallel_tps": run["tokens"] / run["parallel_s"],
        "decode_tps": None,
        "link_mb": bytes_on_link(run) / 1e6,
    }
    decode = run["decode_phase"]
    if decode and decode["tokens"] > 0:
        figures["decode_tps"] = decode["tokens"] / decode["seconds"]
    for label, mbit_s, rtt_ms in LINKS:
        link = link_seconds(run, mbit_s, rtt_ms)
        figures[f"link_s {label}"] = link
        figures[f"link_tps {label}"] = run["tokens"] / (run["parallel_s"] + link)
    return figures


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[dict], cells: list[Cell]) -> dict[str, dict]:
    """Per cell: medians over prompts and repeats, and the median of its ratios to the same prompt's
    and repeat's gamma-0 runs (their median) of the same K; whether every answer equals gamma 0's."""
    summary: dict[str, dict] = {}
    for cell in dict.fromkeys(cells):
        own = [run for run in runs if run["cell"] == cell.name]
        if not own:
            continue
        figures = [derived(run) for run in own]
        entry = {key: median([figure[key] for figure in figures]) for key in figures[0]}
        for key in ("tokens", "rounds", "tokens_per_round", "acceptance_rate", "aggregation_bias"):
            entry[key] = median([run[key] for run in own])
        entry["up_bytes_per_token"] = median([run["bytes_per_token"]["up"] for run in own])
        entry["down_bytes_per_token"] = median([run["bytes_per_token"]["down"] for run in own])
        entry["full_distribution_bytes_per_token"] = median(
            [run["full_distribution_bytes"] / max(run["tokens"], 1) for run in own]
        )
        entry["bytes_as_predicted"] = all(run["measured_equals_expected"] for run in own)
        ratios: dict[str, list[float]] = {"wall_tps": [], "parallel_tps": [], "decode_tps": []}
        same = 0
        for run, figure in zip(own, figures):
            base = [
                other
                for other in runs
                if other["cell"] == cell.baseline.name
                and other["prompt"] == run["prompt"]
                and other["repeat"] == run["repeat"]
            ]
            same += all(other["answer_token_ids"] == run["answer_token_ids"] for other in base) and bool(base)
            for key in ratios:
                base_value = median([derived(other)[key] for other in base])
                if figure[key] is not None and base_value:
                    ratios[key].append(figure[key] / base_value)
        entry["speedup"] = {key: median(values) for key, values in ratios.items()}
        entry["same_as_gamma0"] = f"{same}/{len(own)}"
        entry["runs"] = len(own)
        summary[cell.name] = entry
    return summary


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_tables(summary: dict[str, dict]) -> None:
    print(
        "\n| cell | tok/s wall | tok/s critical path | decode tok/s (after round 1) | decode x vs gamma 0 "
        "| tokens/round | acceptance | B/token up | B/token down | full-dist B/token | = gamma 0 tokens |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for name, entry in summary.items():
        speedup = entry["speedup"]["decode_tps"]
        print(
            f"| {name} | {fmt(entry['wall_tps'])} | {fmt(entry['parallel_tps'])} | {fmt(entry['decode_tps'])} "
            f"| {fmt(speedup)} | {fmt(entry['tokens_per_round'])} | {fmt(entry['acceptance_rate'])} "
            f"| {fmt(entry['up_bytes_per_token'], 0)} | {fmt(entry['down_bytes_per_token'], 0)} "
            f"| {fmt(entry['full_distribution_bytes_per_token'], 0)} | {entry['same_as_gamma0']} |"
        )
    labels = [label for label, _, _ in LINKS]
    print("\nModelled link (not measured): tokens/s = tokens / (critical path + link_s); link_s in brackets")
    print("| cell | MB on link | " + " | ".join(labels) + " |")
    print("|---|---:|" + "---:|" * len(labels))
    for name, entry in summary.items():
        cells = [f"{fmt(entry[f'link_tps {label}'])} ({fmt(entry[f'link_s {label}'], 1)} s)" for label in labels]
        print(f"| {name} | {entry['link_mb']:.2f} | " + " | ".join(cells) + " |")


def bench(args: argparse.Namespace) -> dict:
    workers, draft = MODELS[args.models]
    base = SpecFedConfig(
        workers=tuple(WorkerSpec(name, 1 / len(workers)) for name in workers),
        draft=draft,
        gamma=0,
        top_k=None,
        adaptive_eps=None,
        reconstruct="redistribute",
        encoding="f32",
        temperature=0.0,
        seed=0,
        max_new_tokens=args.max_new_tokens,
    )
    loaded = load_setup(base, "cpu", args.dtype, raw=True, progress=False)
    setup = ClockedSetup(loaded.config, loaded.models, loaded.device, loaded.dtype, raw=True)
    top_ks = [None if word == "all" else int(word) for word in args.top_k.split(",")]
    gammas = [int(word) for word in args.gammas.split(",")]
    cells = cell_order(gammas, args.drafts.split(","), top_ks, args.baseline_every)
    prompts = {item: plain_prompt(setup, gsm8k.few_shot_prompt(item, args.shots).text) for item in args.items}
    print(
        f"{args.models}: workers {', '.join(workers)} (weight 1/{len(workers)} each), draft {draft}; "
        f"GSM8K test items {args.items}, {args.shots}-shot, raw, prompts of "
        f"{[len(prompt) for prompt in prompts.values()]} tokens; greedy, {args.max_new_tokens} new tokens, "
        f"{args.dtype}, {torch.get_num_threads()} threads; {len(cells)} cells x {len(prompts)} prompts x "
        f"{args.repeats} repeats",
        flush=True,
    )
    results = {
        "models": {"workers": list(workers), "draft": draft, "dtype": args.dtype},
        "items": args.items,
        "shots": args.shots,
        "prompt_tokens": [len(prompt) for prompt in prompts.values()],
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "link_model": LINK_MODEL,
        "cells": [dataclasses.asdict(cell) for cell in cells],
        "runs": [],
    }
    runs = results["runs"]
    started = time.monotonic()
    for repeat in range(args.repeats):
        for item, prompt in prompts.items():
            for cell in cells:
                run = run_cell(setup, base, cell, prompt) | {"prompt": item, "repeat": repeat}
                runs.append(run)
                print(
                    f"  r{repeat} item {item} {cell.name}: {run['tokens']} tokens, {run['rounds']} rounds, "
                    f"wall {run['wall_s']:.1f} s, critical path {run['parallel_s']:.1f} s, "
                    f"decode tok/s {fmt(derived(run)['decode_tps'])}",
                    flush=True,
                )
                results["elapsed_s"] = time.monotonic() - started
                write(results, args.out)  # after every run: an interrupted bench keeps what it measured
    results["summary"] = summarize(runs, cells)
    print_tables(results["summary"])
    return results


def namespace_cells(top_k: int | None, gamma: int) -> list[Cell]:
    """The comparison a slow link is about: one token per round with full distributions, speculative
    rounds with top-K, speculative rounds with full distributions."""
    return [Cell(0, LOOKUP_DRAFT, None), Cell(gamma, MODEL_DRAFT, top_k), Cell(gamma, MODEL_DRAFT, None)]


def run_in_namespaces(args: argparse.Namespace, results: dict, prompt_text: str) -> None:
    """The namespace cells as one ``fedattn specfed-party`` process per party, each in its own network
    namespace behind a tbf-shaped veth (``bench/network.py``'s topology; rate only where netem is
    missing), over gloo; the answers are checked against the in-process run of the same cell."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import network

    workers, draft = MODELS[args.models]
    lock = network.LOCK_PATH.open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # network.py's runs use the same namespaces
    topo = network.Topology(len(workers) + 1)
    found = results["namespaces"] = {"runs": [], "shaping": {}, "probes": {}}
    port = network.STORE_PORT_BASE
    with tempfile.TemporaryDirectory(prefix="fa-specfed-") as workdir:
        folder = Path(workdir)
        prompt_file = folder / "prompt.txt"
        prompt_file.write_text(prompt_text, encoding="utf-8")
        own = [[] for _ in workers] + [["--prompt", f"@{prompt_file}"]]
        try:
            topo.setup()
            found["delay_emulation"] = (
                "netem, half the one-way delay on each hop"
                if topo.netem_error is None
                else f"none: netem: {topo.netem_error} (rate only)"
            )
            print(f"\nnamespaces: delay emulation: {found['delay_emulation']}", flush=True)
            for profile in [profile for profile in network.PROFILES if profile.name in args.namespace_links.split(",")]:
                found["shaping"][profile.name] = topo.shape(profile)
                found["probes"][profile.name] = network.probe(profile, topo.parties)
                print(f"{profile.label}: probe {found['probes'][profile.name]}", flush=True)
                for cell in namespace_cells(args.namespace_top_k, args.namespace_gamma):
                    port += 1
                    shared = [
                        *[word for name in workers for word in ("--worker", f"{name}:1")],
                        *("--draft", draft if cell.draft == MODEL_DRAFT else LOOKUP_DRAFT, "--raw"),
                        *("--gamma", str(cell.gamma), "--top-k", cell.k_label, "--device", "cpu"),
                        *("--max-new-tokens", str(results["max_new_tokens"])),
                        *("--timeout", str(network.PARTY_TIMEOUT_S)),
                    ]
                    launched = network.launch_in_namespaces(topo, "specfed-party", own, shared, port, folder)
                    run = namespace_run(launched, cell, profile.name, results["runs"])
                    found["runs"].append(run)
                    print(f"  {profile.label} {cell.name}: {run}", flush=True)
        finally:
            for child in list(network._children):
                network.stop(child)
            problems = topo.teardown()
            if problems:
                print("cleanup problems: " + "; ".join(problems), file=sys.stderr)


def namespace_run(launched: dict, cell: Cell, profile: str, in_process: list[dict]) -> dict:
    """One networked run's figures from its ranks' reports (the server's is the last)."""
    if "error" in launched:
        return {"cell": cell.name, "profile": profile, "error": launched["error"]}
    server = launched["documents"][-1]
    tokens = len(server["answer_token_ids"])
    same = [run for run in in_process if run["cell"] == cell.name and run["prompt"] == in_process[0]["prompt"]]
    return {
        "cell": cell.name,
        "profile": profile,
        "tokens": tokens,
        "rounds": server["rounds"],
        "server_wall_s": server["timing"]["wall_s"],
        "server_decode_s": server["timing"]["decode_s"],
        "tokens_per_s": tokens / server["timing"]["wall_s"],
        "process_s": launched["process_s"],
        "link_bytes_sent": sum(
            party["link_bytes_sent"] for document in launched["documents"] for party in document["parties"]
        ),
        "wire_tx_bytes": sum(launched["wire_tx_bytes_per_party"]),
        "same_as_in_process": (server["answer_token_ids"] == same[0]["answer_token_ids"]) if same else None,
    }


def print_namespace_table(found: dict) -> None:
    print(f"\nNamespaces (measured; delay: {found['delay_emulation']}): server wall s / tokens/s")
    print("| link | cell | rounds | link MB | wire MB | server wall s | tok/s | = in-process tokens |")
    print("|---|---|---:|---:|---:|---:|---:|:---:|")
    for run in found["runs"]:
        if "error" in run:
            print(f"| {run['profile']} | {run['cell']} | failed: {run['error']} |")
            continue
        print(
            f"| {run['profile']} | {run['cell']} | {run['rounds']} | {run['link_bytes_sent'] / 1e6:.2f} "
            f"| {run['wire_tx_bytes'] / 1e6:.2f} | {run['server_wall_s']:.1f} | {run['tokens_per_s']:.2f} "
            f"| {run['same_as_in_process']} |"
        )


def write(results: dict, out: Path | None) -> None:
    if out:
        out.write_text(json.dumps(results, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=sorted(MODELS), default="real")
    parser.add_argument("--out", type=Path, help="write every run and the summary to this JSON file")
    parser.add_argument("--items", type=int, nargs="+", default=None, help="GSM8K test items (default: 0 1)")
    parser.add_argument("--shots", type=int, help="exemplars in each prompt (default 4; tiny: 1)")
    parser.add_argument("--max-new-tokens", type=int, help="default 48 (tiny: 16)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--gammas", default="2,4,8", help="speculative cells' gammas (gamma 0 always runs)")
    parser.add_argument("--drafts", default=f"{MODEL_DRAFT},{LOOKUP_DRAFT}", help="model and/or lookup")
    parser.add_argument(
        "--top-k", help=f"K values, 'all' = full distributions (default {ONE_PERCENT_K},all; tiny: {TINY_K},all)"
    )
    parser.add_argument(
        "--baseline-every", type=int, default=2, help="run gamma 0 again after every N speculative cells (0: once)"
    )
    parser.add_argument(
        "--namespaces",
        action="store_true",
        help="also run gamma 0 K=all, and gamma G K and all with the draft model, one process per party in "
        "network namespaces at 100 and 20 Mbit/s (root; the first item only; after --summarize: only these)",
    )
    parser.add_argument("--namespace-gamma", type=int, default=4)
    parser.add_argument("--namespace-links", default="100mbit,20mbit", help="bench/network.py's profiles to run")
    parser.add_argument("--namespace-top-k", type=int, default=None, help="K of the namespace top-K cell")
    parser.add_argument("--summarize", type=Path, help="only the tables of a (partial) --out file of an earlier run")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.items is None:
        args.items = [0, 1]
    if args.shots is None:
        args.shots = 1 if args.models == "tiny" else 4
    if args.max_new_tokens is None:
        args.max_new_tokens = 16 if args.models == "tiny" else 48
    if args.top_k is None:
        args.top_k = f"{TINY_K if args.models == 'tiny' else ONE_PERCENT_K},all"
    if args.namespace_top_k is None:
        args.namespace_top_k = TINY_K if args.models == "tiny" else ONE_PERCENT_K
    if args.summarize:
        results = json.loads(args.summarize.read_text())
        cells = [Cell(**cell) for cell in results["cells"]]
        results["summary"] = summarize(results["runs"], cells)
        results["link_model"] = LINK_MODEL
        print_tables(results["summary"])
    else:
        results = bench(args)
    if args.namespaces:
        started = time.monotonic()
        run_in_namespaces(args, results, gsm8k.few_shot_prompt(results["items"][0], results["shots"]).text)
        print_namespace_table(results["namespaces"])
        results["namespaces"]["elapsed_s"] = time.monotonic() - started
    print(f"\nelapsed {results['elapsed_s']:.0f} s")
    write(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
