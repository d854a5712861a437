"""``fedattn run --transport torch``: one local OS process per party, and their reports back.

The launcher knows no system: it starts one rank command per party (``python -m fedattn.cli``
with the words it is given, plus the rank's place in the run), hands each its own private words,
and returns the JSON report every rank wrote; merging them is the report layer's job.

It serves the rendezvous store (so any party may die without taking it down), hands each child
its own words through private temporary files, and watches the children: if one fails, the
others get ``timeout + 10`` seconds to notice and exit by themselves, after which they are
killed. Children die with the launcher (parent-death signal), so nothing is left orphaned.
"""

from __future__ import annotations

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

from fedattn.errors import EXIT_USAGE, FedAttnError
from fedattn.network.peers import PeerFailure

GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the launcher goes away."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def launch_local(names: list[str], command: list[str], private: list[dict[str, str]], timeout_s: float) -> list[dict]:
    """Run ``fedattn COMMAND...`` once per party (rank r gets the options in ``private[r]``, each
    value through a file only it is told about) and return every rank's report, in rank order.
    Raises ``PeerFailure`` naming each rank that failed, and how."""
    world_size = len(names)
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="fedattn-") as workdir:
        folder = Path(workdir)
        children = [
            _spawn(folder, rank, world_size, store.port, command, _private_words(folder, rank, private[rank]))
            for rank in range(world_size)
        ]
        codes, exited_at = _watch(children, timeout_s + GRACE_S)
        if any(code != 0 for code in codes):
            refusal = _common_refusal(folder, codes)
            if refusal is not None:
                raise FedAttnError(refusal)
            raise PeerFailure(_failure_summary(folder, names, codes, exited_at))
        reports = [_read_report(folder / f"report-{rank}.json") for rank in range(world_size)]
    if any(report is None for report in reports):
        raise FedAttnError("a party finished without writing its report")
    return reports


def _private_words(folder: Path, rank: int, options: dict[str, str]) -> list[str]:
    """This child's own text, through files only it is told about (mode 0600)."""
    words = []
    for option, text in options.items():
        path = folder / f"{option.lstrip('-')}-{rank}.txt"
        path.touch(mode=0o600)
        path.write_text(text, encoding="utf-8")
        words += [option, f"@{path}"]
    return words


def _spawn(folder: Path, rank: int, world_size: int, port: int, command: list[str], own: list[str]) -> subprocess.Popen:
    words = [
        sys.executable,
        "-m",
        "fedattn.cli",
        *[word for word in command if word != "--json"],
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
        "--json",
    ]
    environment = dict(
        os.environ,
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    return subprocess.Popen(
        words,
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
    lines = ["the networked run failed"]
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
