"""Federation services against one launch per query, gRPC with TLS against gloo, and TLS alone.

Three parts, each printing our figure and its baseline side by side (medians over ``--repeats``,
runs interleaved so that machine noise hits both sides alike):

- ``transports``: one query of N = 4 parties on the real model (the 4-shot GSM8K prompt cut
  TokEx-style, ``--raw``, greedy; the prompt of ``bench/network.py``) launched on loopback with
  ``fedattn run --transport torch`` (gloo) and ``--transport grpc`` (mutual TLS), per schedule: the
  publisher's time to first token (its ``wall_s - decode_s``: from the start of its run, after
  join, to its first token), its total (``wall_s``), and the whole launch (process start and
  model load included). The shaped namespace links are ``bench/network.py --transports torch,grpc``.
- ``tls``: the cost of TLS alone: one gRPC link on loopback carrying K/V-sized frames one call at a
  time (as a transport link does), mutual TLS against plaintext, same server code; throughput,
  per-frame time and connection set-up.
- ``services``: queries per minute answered by ``fedattn serve`` processes that stay up (one per
  party; ``fedattn ask`` per query) against one ``fedattn run --transport grpc`` launch per query
  (every process started and every model loaded again), same prompt and schedule.

    .venv/bin/python bench/federation.py --out federation.json            # all parts, ~15 min on 2 cores
    .venv/bin/python bench/federation.py --parts tls --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

SCHEDULES = {
    "H=1": ["--sync-every", "1"],
    "H=4": ["--sync-every", "4"],
    "publisher-dense": ["--schedule", "publisher-dense"],
}
RUN_LIMIT_S = 600
SERVE_READY_S = 300


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def environment() -> dict:
    from network import common_env

    return common_env(1)


# -- transports -----------------------------------------------------------------------------------


def publisher_times(document: dict) -> dict:
    publisher = document["parties"][-1]
    return {
        "ttft_s": publisher["wall_s"] - publisher["decode_s"],
        "total_s": publisher["wall_s"],
        "answer_token_ids": document["answer_token_ids"],
        "link_bytes_sent": sum(party["link_bytes_sent"] for party in document["parties"]),
    }


def launch(words: list[str], transport: str) -> dict:
    command = [sys.executable, "-m", "fedattn.cli", "run", *words, "--transport", transport, "--json"]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=REPO, timeout=RUN_LIMIT_S)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return publisher_times(json.loads(done.stdout)) | {"launch_s": seconds}


def bench_transports(args: argparse.Namespace, words: list[str], results: dict) -> None:
    found = results["transports"] = {}
    for name, schedule in SCHEDULES.items():
        runs: dict[str, list[dict]] = {"torch": [], "grpc": []}
        for repeat in range(args.repeats):
            for transport in ("torch", "grpc") if repeat % 2 == 0 else ("grpc", "torch"):
                run = launch([*words, *schedule], transport)
                runs[transport].append(run)
                print(f"  {name} {transport} #{repeat + 1}: {brief(run)}", flush=True)
        found[name] = {transport: summarize(entries) for transport, entries in runs.items()}
        found[name]["runs"] = runs


def summarize(entries: list[dict]) -> dict:
    good = [entry for entry in entries if "error" not in entry]
    summary = {"runs": len(entries), "failed": len(entries) - len(good)}
    for key in ("ttft_s", "total_s", "launch_s"):
        summary[key] = median([entry[key] for entry in good if key in entry])
    tokens = {json.dumps(entry["answer_token_ids"]) for entry in good}
    summary["same_tokens_every_run"] = len(tokens) <= 1
    summary["answer_token_ids"] = json.loads(tokens.pop()) if len(tokens) == 1 else None
    summary["link_bytes_sent"] = sorted({entry["link_bytes_sent"] for entry in good})
    return summary


def brief(run: dict) -> str:
    if "error" in run:
        return f"FAILED: {run['error']}"
    return f"TTFT {run['ttft_s']:.2f} s, total {run['total_s']:.2f} s, launch {run.get('launch_s', 0):.1f} s"


def print_transports(found: dict) -> None:
    print("\nLoopback, N = 4: gRPC with mutual TLS against gloo (medians; seconds)")
    print(
        f"{'schedule':17}{'gloo TTFT':>10}{'gRPC TTFT':>10}{'ratio':>7}{'gloo total':>11}{'gRPC total':>11}"
        f"{'ratio':>7}{'gloo launch':>12}{'gRPC launch':>12}  same tokens"
    )
    for name, entry in found.items():
        torch_, grpc_ = entry["torch"], entry["grpc"]
        same = torch_["answer_token_ids"] is not None and torch_["answer_token_ids"] == grpc_["answer_token_ids"]
        print(
            f"{name:17}{torch_['ttft_s']:10.2f}{grpc_['ttft_s']:10.2f}{grpc_['ttft_s'] / torch_['ttft_s']:7.2f}"
            f"{torch_['total_s']:11.2f}{grpc_['total_s']:11.2f}{grpc_['total_s'] / torch_['total_s']:7.2f}"
            f"{torch_['launch_s']:12.1f}{grpc_['launch_s']:12.1f}  {'yes' if same else 'NO'}"
        )


# -- TLS alone ------------------------------------------------------------------------------------


def bench_tls(args: argparse.Namespace, results: dict) -> None:
    """One link, the same generic raw-bytes handler, with and without mutual TLS."""
    import grpc

    from fedattn.network.federation import free_loopback_addresses, init_federation

    sizes = {"K/V frame, 156 tokens bf16 (80 KB)": 2 * 156 * 2 * 64 * 2 + 22, "1 MB frame": 1 << 20}
    frames_per_run = {name: max(8, int(args.tls_megabytes * 1e6 / size)) for name, size in sizes.items()}
    found = results["tls"] = {"frames_per_run": frames_per_run}
    with tempfile.TemporaryDirectory(prefix="fedattn-bench-") as folder:
        roster = init_federation(Path(folder) / "fed", ["a", "b"], free_loopback_addresses(2), ["b"])
        server_cred, client_cred = roster.credentials("b"), roster.credentials("a")
        plain_address, tls_address = free_loopback_addresses(2)
        server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.max_receive_message_length", 1 << 22)])
        handler = grpc.unary_unary_rpc_method_handler(lambda frame, context: b"")
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Link", {"Deliver": handler})])
        server.add_insecure_port(plain_address)
        tls = grpc.ssl_server_credentials(
            [(server_cred.key_pem, server_cred.cert_pem)],
            root_certificates=server_cred.ca_pem,
            require_client_auth=True,
        )
        server.add_secure_port(tls_address, tls)
        server.start()
        try:

            def channel(kind: str) -> grpc.Channel:
                if kind == "plaintext":
                    return grpc.insecure_channel(plain_address)
                credentials = grpc.ssl_channel_credentials(
                    client_cred.ca_pem, client_cred.key_pem, client_cred.cert_pem
                )
                return grpc.secure_channel(tls_address, credentials, options=[("grpc.ssl_target_name_override", "b")])

            for name, size in sizes.items():
                frame = os.urandom(size)
                samples: dict[str, dict[str, list[float]]] = {}
                for repeat in range(args.repeats):
                    for kind in ("plaintext", "mutual TLS") if repeat % 2 == 0 else ("mutual TLS", "plaintext"):
                        start = time.perf_counter()
                        link = channel(kind)
                        deliver = link.unary_unary("/bench.Link/Deliver")
                        deliver(b"x", timeout=30)  # connection set-up (and the TLS handshake) and one tiny call
                        setup = time.perf_counter() - start
                        start = time.perf_counter()
                        for _ in range(frames_per_run[name]):
                            deliver(frame, timeout=30)
                        seconds = time.perf_counter() - start
                        link.close()
                        got = samples.setdefault(kind, {"setup_s": [], "mb_s": [], "ms_per_frame": []})
                        got["setup_s"].append(setup)
                        got["mb_s"].append(size * frames_per_run[name] / seconds / 1e6)
                        got["ms_per_frame"].append(seconds / frames_per_run[name] * 1e3)
                found[name] = {
                    kind: {key: median(values) for key, values in got.items()} | {"samples": got}
                    for kind, got in samples.items()
                }
                print(f"  {name}: {tls_line(found[name])}", flush=True)
        finally:
            server.stop(0)


def tls_line(entry: dict) -> str:
    plain, tls = entry["plaintext"], entry["mutual TLS"]
    return (
        f"plaintext {plain['mb_s']:.0f} MB/s ({plain['ms_per_frame']:.2f} ms/frame), "
        f"mutual TLS {tls['mb_s']:.0f} MB/s ({tls['ms_per_frame']:.2f} ms/frame): "
        f"TLS x{tls['ms_per_frame'] / plain['ms_per_frame']:.2f} per frame; "
        f"set-up {plain['setup_s'] * 1e3:.1f} ms vs {tls['setup_s'] * 1e3:.1f} ms"
    )


# -- services -------------------------------------------------------------------------------------


class Services:
    """``fedattn serve`` for every party of a throwaway loopback federation; stopped on exit."""

    def __init__(self, folder: Path, model_words: list[str], contexts: list[str]) -> None:
        from fedattn.network.federation import free_loopback_addresses, init_federation

        self.names = [f"party-{n + 1}" for n in range(len(contexts))] + ["publisher"]
        roster = init_federation(folder / "fed", self.names, free_loopback_addresses(len(self.names)), ["publisher"])
        self.roster = roster.folder / "roster.toml"
        self.children: list[subprocess.Popen] = []
        for name, context in zip(self.names, [*contexts, None]):
            command = [sys.executable, "-m", "fedattn.cli", "serve", "--roster", str(self.roster), "--name", name]
            command += model_words + ([] if context is None else ["--context", context])
            log = (folder / f"serve-{name}.log").open("w")
            self.children.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment(), cwd=REPO)
            )
        self.logs = [folder / f"serve-{name}.log" for name in self.names]

    def ask(self, words: list[str]) -> dict:
        """One ``fedattn ask`` command: a new client process per query."""
        done = subprocess.run(
            [*self._ask_words(), *words, "--json"],
            capture_output=True,
            text=True,
            env=environment(),
            cwd=REPO,
            timeout=RUN_LIMIT_S,
        )
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
        return publisher_times(json.loads(done.stdout))

    def client(self, words: list[str]):
        """A client that stays up too: this process asks through the library (``network.service.ask``),
        with the words ``fedattn ask`` would send."""
        from fedattn.cli.main import parse_words
        from fedattn.network.federation import load_roster
        from fedattn.network.service import ask
        from fedattn.systems import DEFAULT_SYSTEM, get_system

        args = parse_words([*self._ask_words()[3:], *words])
        options, private = get_system(DEFAULT_SYSTEM).ask_input(args)
        roster = load_roster(self.roster)
        credentials = roster.credentials("publisher")

        def one() -> dict:
            try:
                return publisher_times(ask(roster, "publisher", credentials, None, options, private))
            except Exception as error:  # noqa: BLE001 - a failed query is a figure of the bench
                return {"error": str(error)}

        return one

    def _ask_words(self) -> list[str]:
        return [sys.executable, "-m", "fedattn.cli", "ask", "--roster", str(self.roster), "--name", "publisher"]

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=20)
            if child.poll() is None:
                child.kill()


def bench_services(
    args: argparse.Namespace, model_words: list[str], contexts: list[str], question: str, results: dict
) -> None:
    schedule = SCHEDULES[args.service_schedule]
    query = ["--question", question, "--raw", "--max-new-tokens", str(args.max_new_tokens), *schedule]
    found = results["services"] = {"schedule": args.service_schedule, "queries": args.queries}
    with tempfile.TemporaryDirectory(prefix="fedattn-bench-") as workdir:
        services = Services(Path(workdir), model_words, contexts)
        try:
            start = time.monotonic()
            warm = None
            while time.monotonic() - start < SERVE_READY_S:  # the first answer: every service is up
                warm = services.ask(query)
                if "error" not in warm:
                    break
                time.sleep(2)
            found["first_answer_after_start_s"] = time.monotonic() - start
            print(
                f"  services up, first answer after {found['first_answer_after_start_s']:.1f} s: {brief(warm)}",
                flush=True,
            )
            start = time.monotonic()
            asked = [services.ask(query) for _ in range(args.queries)]
            seconds = time.monotonic() - start
            print(f"  serve + fedattn ask: {args.queries} queries in {seconds:.1f} s", flush=True)
            client = services.client(query)
            start = time.monotonic()
            by_client = [client() for _ in range(args.queries)]
            client_seconds = time.monotonic() - start
            print(f"  serve + a client that stays up: {args.queries} queries in {client_seconds:.1f} s", flush=True)
        finally:
            services.stop()
    found["serve"] = series(asked, seconds, args.queries)
    found["serve_client"] = series(by_client, client_seconds, args.queries)
    words = [*model_words, *[w for c in contexts for w in ("--context", c)], *query]
    start = time.monotonic()
    launched = []
    for n in range(args.queries):
        launched.append(launch(words, "grpc"))
        print(f"  launch #{n + 1}: {brief(launched[-1])}", flush=True)
    seconds = time.monotonic() - start
    found["launch"] = series(launched, seconds, args.queries)
    tokens = {json.dumps(run.get("answer_token_ids")) for run in [*asked, *by_client, *launched]}
    found["same_tokens_everywhere"] = len(tokens) == 1


def series(runs: list[dict], seconds: float, queries: int) -> dict:
    return {
        "seconds": seconds,
        "queries_per_minute": queries * 60 / seconds,
        "failed": sum("error" in run for run in runs),
        "median_total_s": median([run["total_s"] for run in runs if "error" not in run]),
        "runs": runs,
    }


def print_services(found: dict) -> None:
    launched = found["launch"]
    print(f"\nQueries per minute, N = 4, {found['schedule']}, {found['queries']} queries one after another")
    rows = [
        ("one launch per query (fedattn run --transport grpc)", launched),
        ("services, a fedattn ask command per query", found["serve"]),
        ("services, a client that stays up", found["serve_client"]),
    ]
    for label, entry in rows:
        ratio = entry["queries_per_minute"] / launched["queries_per_minute"]
        print(
            f"  {label:52}{entry['queries_per_minute']:7.2f}/min  x{ratio:.2f}  "
            f"(publisher total {entry['median_total_s']:.2f} s median, {entry['failed']} failed)"
        )
    print(f"  same tokens in every query: {found['same_tokens_everywhere']}")


# -- main -----------------------------------------------------------------------------------------


def main() -> int:
    from fedattn.runtime.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="tls,transports,services", help="a comma list of tls, transports, services")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--parties", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=5, help="queries per side of the services part")
    parser.add_argument("--service-schedule", default="H=4", choices=list(SCHEDULES))
    parser.add_argument("--tls-megabytes", type=float, default=50.0, help="bytes per TLS run, in MB")
    args = parser.parse_args()
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    results: dict = {"model": args.model, "parties": args.parties, "load_average_before": load_average()}
    started = time.monotonic()
    if "tls" in parts:
        print("TLS alone: one gRPC link on loopback, frames one call at a time", flush=True)
        bench_tls(args, results)
    if "transports" in parts or "services" in parts:
        from network import prompt_texts, write_private

        contexts, question, prompt = prompt_texts(args.model, args.parties, 4, 0)
        results["prompt"] = prompt
        model_words = ["--model", args.model, "--device", "cpu"]  # a service's own; --raw goes with each query
        with tempfile.TemporaryDirectory(prefix="fedattn-bench-") as workdir:
            folder = Path(workdir)
            context_args = [write_private(folder, f"context-{r}.txt", text) for r, text in enumerate(contexts)]
            question_arg = write_private(folder, "question.txt", question)
            words = [*model_words, "--raw", "--max-new-tokens", str(args.max_new_tokens), "--question", question_arg]
            words += [word for a in context_args for word in ("--context", a)]
            print(
                f"{args.model}: N = {args.parties}, prompt {prompt['segment_tokens']} tokens, --raw, "
                f"{args.max_new_tokens} new tokens, 1 thread per party process",
                flush=True,
            )
            if "transports" in parts:
                bench_transports(args, words, results)
            if "services" in parts:
                bench_services(args, model_words, context_args, question_arg, results)
    results["load_average_after"] = load_average()
    results["elapsed_s"] = time.monotonic() - started
    if "tls" in parts:
        print("\nTLS alone (medians)")
        for name, entry in results["tls"].items():
            if name != "frames_per_run":
                print(f"  {name}: {tls_line(entry)}")
    if "transports" in parts:
        print_transports(results["transports"])
    if "services" in parts:
        print_services(results["services"])
    from network import close_results

    close_results(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
