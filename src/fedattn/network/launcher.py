"""``fedattn run --transport torch|grpc``: one local OS process per party, and their reports back.

The launcher knows no system: it starts one party command per party (``python -m fedattn.cli`` with
the words it is given, plus the party's place in the run), hands each its own private words, and
returns the JSON report every party wrote; merging them is the report layer's job.

Over ``torch`` it serves the rendezvous store (so any party may die without taking it down) and
tells each child its rank; over ``grpc`` it makes a throwaway federation in a temporary folder (a
CA, every party's key and certificate, a roster on free loopback ports in which the last party may
start queries) and tells each child its name. Private text never touches the disk: each child reads
its own words from a pipe it inherits (``@/dev/fd/N``, written once the child runs, so a large text
cannot block the start) and writes its report into another; its stderr comes back through a pipe.

It watches the children: if one fails, the others get ``timeout + 10`` seconds to notice and exit
by themselves, after which they are killed. Children die with the launcher (parent-death signal);
SIGTERM and SIGINT first kill them and remove the temporary folder, then end the launcher as the
signal would have.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch.distributed as dist

from fedattn.errors import EXIT_USAGE, FedAttnError
from fedattn.network.federation import ROSTER_FILE, free_loopback_addresses, init_federation
from fedattn.network.peers import PeerFailure

TRANSPORTS = ("torch", "grpc")
GRACE_S = 10.0
THREAD_JOIN_S = 5.0  # a pipe's thread outliving its child by more than this is abandoned (it is a daemon)
STDERR_KEPT = 64 * 1024  # bytes of each child's stderr kept for the failure summary
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # bound here: the child only calls it, between fork and exec


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the launcher goes away."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def launch_local(
    names: list[str], command: list[str], private: list[dict[str, str]], timeout_s: float, transport: str = "torch"
) -> list[dict]:
    """Run ``fedattn COMMAND...`` once per party over ``transport`` (party r gets the options in
    ``private[r]``, each value through a pipe only it inherits) and return every party's report,
    in rank order. Raises ``FedAttnError`` with the one refusal when every party refused the run,
    else ``PeerFailure`` naming each party that failed, and how."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}")
    children: list[_Child] = []
    with _unwound_by_signals(), _places(transport, names) as places:
        try:
            for rank, place in enumerate(places):
                children.append(_Child(command, place, private[rank]))
            for child in children:  # only now: no thread runs while a child is forked
                child.feed_and_drain()
            codes, exited_at = _watch(children, timeout_s + GRACE_S)
        finally:
            for child in children:
                child.stop()
    if any(code != 0 for code in codes):
        refusal = _common_refusal(children, names, codes)
        if refusal is not None:
            raise FedAttnError(refusal)
        raise PeerFailure(_failure_summary(children, names, codes, exited_at))
    reports = [child.report() for child in children]
    if any(report is None for report in reports):
        raise FedAttnError("a party finished without writing its report")
    return reports


class _Stopped(BaseException):
    """SIGTERM or SIGINT reached the launcher: unwinds, so that every clean-up runs."""


@contextmanager
def _unwound_by_signals() -> Iterator[None]:
    """Turn the first SIGTERM or SIGINT into an unwinding exception, then, once everything inside
    has cleaned up, deliver it again to the handler it would have met (SIGINT: KeyboardInterrupt;
    SIGTERM: usually the end of the process). A signal the process ignores stays ignored; only the
    main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def stop(number: int, _frame) -> None:
        if not received:  # later signals must not interrupt the clean-up the first one started
            received.append(number)
            raise _Stopped

    wanted = [number for number in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(number) is not signal.SIG_IGN]
    previous = {number: signal.signal(number, stop) for number in wanted}
    try:
        yield
    except _Stopped:
        pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        signal.raise_signal(received[0])
        sys.exit(128 + received[0])  # only if its handler let the process go on


@contextmanager
def _places(transport: str, names: list[str]) -> Iterator[list[list[str]]]:
    """Each party's words for where it meets the others, valid while this context lasts."""
    count = len(names)
    if transport == "torch":
        store = dist.TCPStore("127.0.0.1", 0, count, is_master=True, wait_for_workers=False)
        rendezvous = ["--world-size", str(count), "--master", f"127.0.0.1:{store.port}", "--external-store"]
        yield [["--rank", str(rank), *rendezvous] for rank in range(count)]
        return
    with tempfile.TemporaryDirectory(prefix="fedattn-") as workdir:
        folder = Path(workdir) / "federation"
        init_federation(folder, names, free_loopback_addresses(count), names[-1:])
        yield [["--roster", str(folder / ROSTER_FILE), "--name", name] for name in names]


class _Child:
    """One party's process and its pipes: its own words in, its report and stderr out."""

    def __init__(self, command: list[str], place: list[str], own: dict[str, str]) -> None:
        feeds = {option: os.pipe() for option in own}
        report_in, report_out = os.pipe()
        inherited = [report_out, *(read_end for read_end, _ in feeds.values())]
        words = [
            sys.executable,
            "-m",
            "fedattn.cli",
            *[word for word in command if word != "--json"],
            *place,
            "--report",
            f"/dev/fd/{report_out}",
            *[word for option, (read_end, _) in feeds.items() for word in (option, f"@/dev/fd/{read_end}")],
            "--json",
        ]
        environment = dict(
            os.environ,
            GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        )
        # our ends, as files (closing one twice is harmless); the child's ends are closed here once it has them
        self._feeds = [(os.fdopen(write_end, "wb"), own[option]) for option, (_, write_end) in feeds.items()]
        self._report_pipe = os.fdopen(report_in, "rb")
        try:
            self.process = subprocess.Popen(
                words,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=environment,
                pass_fds=inherited,
                preexec_fn=_die_with_parent,
            )
        except BaseException:
            self._close_pipes()
            raise
        finally:
            for descriptor in inherited:
                os.close(descriptor)
        self._report = bytearray()
        self._stderr = bytearray()
        self._threads: list[threading.Thread] = []

    def feed_and_drain(self) -> None:
        """Write the child's words into its pipes and read its report and stderr, each in a thread,
        so that neither side ever blocks on a full pipe."""
        targets = [(_feed, (pipe, text)) for pipe, text in self._feeds]
        targets += [(_drain, (self._report_pipe, self._report, None))]
        targets += [(_drain, (self.process.stderr, self._stderr, STDERR_KEPT))]
        self._threads = [threading.Thread(target=target, args=args, daemon=True) for target, args in targets]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Kill the child if it still runs, let its pipes' threads finish, and close the pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for thread in self._threads:
            thread.join(THREAD_JOIN_S)
        self._close_pipes()
        self.process.stderr.close()

    def _close_pipes(self) -> None:
        for pipe in [pipe for pipe, _ in self._feeds] + [self._report_pipe]:
            try:
                pipe.close()
            except BrokenPipeError:  # a buffered write the child never read
                pass

    def report(self) -> dict | None:
        try:
            return json.loads(bytes(self._report))
        except ValueError:
            return None

    def last_line(self) -> str:
        lines = [line for line in self._stderr.decode(errors="replace").splitlines() if line.strip()]
        return lines[-1].removeprefix("fedattn: error: ")[:300] if lines else ""


def _feed(pipe: BinaryIO, text: str) -> None:
    try:
        with pipe:
            pipe.write(text.encode("utf-8"))
    except BrokenPipeError:  # the child ended before reading: its exit code says why
        pass


def _drain(pipe: BinaryIO, into: bytearray, keep: int | None) -> None:
    """Read a pipe to its end (the child's exit), keeping only the last ``keep`` bytes if given."""
    while chunk := pipe.read1(65536):
        into += chunk
        if keep is not None and len(into) > keep:
            del into[:-keep]


def _watch(children: list[_Child], grace_s: float) -> tuple[list[int], list[float]]:
    """Wait for every child (exit codes and monotonic exit times); once one fails, give the rest
    ``grace_s`` before killing them."""
    failed_at = None
    exited_at = [0.0] * len(children)
    while True:
        codes = [child.process.poll() for child in children]  # every child, every round: no short-circuit
        now = time.monotonic()
        exited_at = [at or (now if code is not None else 0.0) for at, code in zip(exited_at, codes)]
        if all(code is not None for code in codes):
            return codes, exited_at
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for child in children:
                if child.process.poll() is None:
                    child.process.kill()
        time.sleep(0.05)


def _common_refusal(children: list[_Child], names: list[str], codes: list[int]) -> str | None:
    """When every party refused the run as a usage error (the user's mistake, e.g. a block the
    model lacks, made once in the shared options), that refusal in one line, once if every party
    said the same; else None: a party died or failed because another did."""
    if any(code != EXIT_USAGE for code in codes):
        return None
    messages = [child.last_line() for child in children]
    if len(set(messages)) == 1:
        return messages[0]
    said = [f"{name} (rank {rank}): {message}" for rank, (name, message) in enumerate(zip(names, messages))]
    return "every party refused the run: " + "; ".join(said)


def _failure_summary(children: list[_Child], names: list[str], codes: list[int], exited_at: list[float]) -> str:
    first_failure = min(at for at, code in zip(exited_at, codes) if code != 0)
    lines = ["the networked run failed"]
    for rank, code in enumerate(codes):
        if code == 0:
            continue
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        how += f", {exited_at[rank] - first_failure:.1f} s after the first failure"
        last = children[rank].last_line()
        lines.append(f"  {names[rank]} (rank {rank}): {how}" + (f": {last}" if last else ""))
    return "\n".join(lines)
