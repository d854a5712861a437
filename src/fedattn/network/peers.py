"""What every networked transport shares about its peers: the failure that names one, the
heartbeat timings, the rehearsed faults, and the wait on a peer's inbox.

Both the gloo and the gRPC transport name a dead or stalled party the same way and honour the same
``FEDATTN_INJECT_FAULT`` drills, so these live once, below both.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable

from fedattn.errors import FedAttnError

BEAT_INTERVAL_S = 0.5
MIN_BEAT_GAP_S = 0.05  # a phase change is published at once, but not more often than this
STALE_AFTER_S = 5.0  # no heartbeat for this long: the process is dead or stopped
POLL_S = 0.25
# Fault injection for tests and drills: "RANK@PHASE=kill" (SIGKILL itself) or "RANK@PHASE=stall"
# (stop working but keep its heartbeat) when that rank reaches that phase, e.g. "1@prefill block 3=kill".
FAULT_ENV = "FEDATTN_INJECT_FAULT"


class PeerFailure(FedAttnError):
    """Another party is gone or stalled; the message names it and what it was doing."""


def fault_for(rank: int) -> tuple[str, str] | None:
    """The (phase, action) this rank is told to rehearse, if any."""
    spec = os.environ.get(FAULT_ENV, "")
    where, _, action = spec.rpartition("=")
    target, _, phase = where.partition("@")
    if not spec or not target.isdigit() or int(target) != rank:
        return None
    if action not in ("kill", "stall"):
        raise ValueError(f"{FAULT_ENV} action must be kill or stall, got {action!r}")
    return phase, action


def inject(action: str) -> None:
    time.sleep(4 * MIN_BEAT_GAP_S)  # let the heartbeat publish the phase it dies or stalls in
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Event().wait()  # stall: the heartbeat thread keeps beating, nothing else moves


def take(inbox: queue.Queue, check: Callable[[], None]) -> bytes:
    """The next frame from one peer's inbox; between polls ``check`` raises, naming the culprit,
    when a link broke or a peer is gone or stalled."""
    while True:
        try:
            return inbox.get(timeout=POLL_S)
        except queue.Empty:
            check()
