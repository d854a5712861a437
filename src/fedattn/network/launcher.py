"""``fedattn run --transport torch``: one local OS process per party, then one merged report.

The launcher serves the rendezvous store (so any party may die without taking it down), hands
each child only its own text (a private temporary file), and watches the children: if one fails,
the others get ``timeout + 10`` seconds to notice and exit by themselves, after which they are
killed. Children die with the launcher (parent-death signal), so nothing is left orphaned.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from fedattn.errors import EXIT_PEER_FAILURE, EXIT_USAGE, FedAttnError
from fedattn.systems.fedattn.inprocess import party_names

GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the launcher goes away."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def launch_local(
    args: argparse.Namespace, contexts: list[str], question: str, publisher_context: str | None, shared_argv: list[str]
) -> int:
    world_size = len(contexts) + 1
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    names = party_names(world_size)
    with tempfile.TemporaryDirectory(prefix="fedattn-") as workdir:
        folder = Path(workdir)
        children = [
            _spawn(
                folder,
                rank,
                world_size,
                store.port,
                shared_argv,
                _own_words(folder, rank, contexts, question, publisher_context),
            )
            for rank in range(world_size)
        ]
        codes, exited_at = _watch(children, args.timeout + GRACE_S)
        reports = [_read_report(folder / f"report-{rank}.json") for rank in range(world_size)]
        if any(code != 0 for code in codes):
            refusal = _common_refusal(folder, codes)
            if refusal is not None:
                raise FedAttnError(refusal)
            print(_failure_summary(folder, names, codes, exited_at), file=sys.stderr)
            return EXIT_PEER_FAILURE
    merged = merge_reports(reports)
    if args.json:
        print(json.dumps(merged, indent=2))
    else:
        from fedattn.report.render import print_merged_report

        print_merged_report(merged)
    return 0


def _own_words(folder: Path, rank: int, contexts: list[str], question: str, publisher_context: str | None) -> list[str]:
    """This child's own text, through files only it is told about (mode 0600)."""

    def private(name: str, text: str) -> str:
        path = folder / f"{name}-{rank}.txt"
        path.touch(mode=0o600)
        path.write_text(text, encoding="utf-8")
        return f"@{path}"

    if rank < len(contexts):
        return ["--context", private("context", contexts[rank])]
    words = ["--question", private("question", question)]
    if publisher_context is not None:
        words += ["--publisher-context", private("publisher-context", publisher_context)]
    return words


def _spawn(
    folder: Path, rank: int, world_size: int, port: int, shared_argv: list[str], own: list[str]
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "fedattn.cli",
        "participant",
        "--rank",
        str(rank),
        "--world-size",
        str(world_size),
        "--master",
        f"127.0.0.1:{port}",
        "--external-store",
        "--report",
        str(folder / f"report-{rank}.json"),
        *own,
        *[word for word in shared_argv if word != "--json"],
        "--json",
    ]
    environment = dict(
        os.environ,
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=(folder / f"stderr-{rank}.txt").open("w"),
        env=environment,
        preexec_fn=_die_with_parent,
    )


def _watch(children: list[subprocess.Popen], grace_s: float) -> tuple[list[int], list[float]]:
    """Wait for every child (exit codes and monotonic exit times); once one fails, give the rest
    ``grace_s`` before killing them."""
    failed_at = None
    exited_at = [0.0] * len(children)
    while True:
        codes = [child.poll() for child in children]  # every child, every round: no short-circuit
        now = time.monotonic()
        exited_at = [at or (now if code is not None else 0.0) for at, code in zip(exited_at, codes)]
        if all(code is not None for code in codes):
            return codes, exited_at
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for child in children:
                if child.poll() is None:
                    child.kill()
        time.sleep(0.05)


def _read_report(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _common_refusal(folder: Path, codes: list[int]) -> str | None:
    """The one message with which every party refused the run (the user's mistake, e.g. a block
    the model lacks, made once in the shared options), else None: no party died."""
    if any(code != EXIT_USAGE for code in codes):
        return None
    messages = {_last_line(folder / f"stderr-{rank}.txt") for rank in range(len(codes))}
    return messages.pop() if len(messages) == 1 else None


def _failure_summary(folder: Path, names: list[str], codes: list[int], exited_at: list[float]) -> str:
    first_failure = min(at for at, code in zip(exited_at, codes) if code != 0)
    lines = ["fedattn: error: the networked run failed"]
    for rank, code in enumerate(codes):
        if code == 0:
            continue
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        how += f", {exited_at[rank] - first_failure:.1f} s after the first failure"
        last = _last_line(folder / f"stderr-{rank}.txt")
        lines.append(f"  {names[rank]} (rank {rank}): {how}" + (f": {last}" if last else ""))
    return "\n".join(lines)


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].removeprefix("fedattn: error: ")[:300] if lines else ""


def merge_reports(reports: list[dict | None]) -> dict:
    """The launcher's summary: the publisher's answer, every rank's traffic, totals and savings."""
    if any(report is None for report in reports):
        raise FedAttnError("a party finished without writing its report")
    publisher = reports[-1]
    return {
        "answer": publisher["answer"],
        "answer_token_ids": publisher["answer_token_ids"],
        "sync_layers": publisher["sync_layers"],
        "schedule": publisher["schedule"],
        "model": publisher["model"],
        "transport": "torch (gloo)",
        "participants": reports,
        "expected_bytes": {"sent": sum(r["expected_bytes_sent"] for r in reports)},
        "measured_bytes": {
            "sent": sum(r["bytes_sent"] for r in reports),
            "received": sum(r["bytes_received"] for r in reports),
            "link_sent": sum(r["link_bytes_sent"] for r in reports),
        },
        "all_gather_bytes_sent": sum(r["all_gather_bytes_sent"] for r in reports),
        "timing": {
            "wall_s": max(r["wall_s"] for r in reports),
            "prefill_s": max(r["prefill_s"] for r in reports),
            "decode_s": publisher["decode_s"],
            "wait_s": {r["name"]: r["wait_s"] for r in reports},
        },
    }
