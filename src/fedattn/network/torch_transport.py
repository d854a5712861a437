"""A transport over torch.distributed (gloo over TCP): one OS process per party, on any hosts.

Frames travel as two point-to-point messages, an int64 size then the uint8 payload followed by an
end mark; the size is checked against the caller's bound before anything is allocated, and the end
mark proves the payload arrived whole (gloo completes a shorter message without a word). No object collective (they
pickle) is used. A receiver thread takes frames from any sender as they come and files them per
sender, so the main thread can wait with a deadline while it watches the others' heartbeats:
a party that died or stopped is named, with what it was doing, instead of a bare socket error.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fedattn.errors import FedAttnError, ProtocolError
from fedattn.network.peers import BEAT_INTERVAL_S, MIN_BEAT_GAP_S, STALE_AFTER_S, PeerFailure, fault_for, inject, take
from fedattn.network.transport import Transport

SIZE_TAG, PAYLOAD_TAG = 11, 12
# The payload message's last byte. gloo completes a receive whose message is SHORTER than the buffer
# and does not say how much arrived; the receiver clears this slot first, so a truncated payload
# leaves it clear instead of passing off stale memory as the frame's tail.
END_MARK = 0xE5
NO_DEADLINE = datetime.timedelta(days=7)  # gloo's own timeout; ours are enforced above it
STORE_CLIENT_TIMEOUT_S = 5.0  # a heartbeat client's store calls
CONNECT_MARGIN_S = 2.0  # past the store's own connect timeout: a listener that never answers


@dataclass
class _Beat:
    value: bytes = b""
    changed_at: float = 0.0
    progress: bytes = b""
    progressed_at: float = 0.0


class Liveness:
    """Heartbeats through the rendezvous store: each process publishes "seq progress phase" every
    half second; a watcher notes when each value last changed by its own clock (no clock sync)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.phase = "starting"
        self.progress = 0
        self._host, self._port = host, port
        self._beats = {n: _Beat() for n in range(world_size) if n != rank}
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._publisher_store = self._client()
        self._reader_store = self._client()
        self._thread = threading.Thread(target=self._publish, name="fedattn-heartbeat", daemon=True)
        self._thread.start()

    def _client(self) -> dist.TCPStore:
        return connect_store(self._host, self._port, STORE_CLIENT_TIMEOUT_S)

    def note(self, phase: str) -> None:
        """The main thread moved on; waiting peers see progress."""
        self.phase = phase
        self.progress += 1
        self._changed.set()

    def _publish(self) -> None:
        sequence = 0
        while not self._stop.is_set():
            sequence += 1
            try:
                self._publisher_store.set(f"fedattn/beat/{self.rank}", f"{sequence} {self.progress} {self.phase}")
            except Exception:  # noqa: BLE001 - the store's host is gone; waiters will say so
                return
            self._changed.clear()
            self._changed.wait(BEAT_INTERVAL_S)
            self._stop.wait(MIN_BEAT_GAP_S)

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        now = time.monotonic()
        for rank, beat in self._beats.items():
            value = self._reader_store.get(f"fedattn/beat/{rank}") if self._has(rank) else b""
            if value != beat.value or not beat.changed_at:
                beat.value, beat.changed_at = value, now
            progress = value.split(b" ", 2)[1] if value.count(b" ") >= 2 else b""
            if progress != beat.progress or not beat.progressed_at:
                beat.progress, beat.progressed_at = progress, now

    def _has(self, rank: int) -> bool:
        return self._reader_store.check([f"fedattn/beat/{rank}"])

    def silent_for(self, rank: int) -> float:
        return time.monotonic() - self._beats[rank].changed_at

    def idle_for(self, rank: int) -> float:
        return time.monotonic() - self._beats[rank].progressed_at

    def phase_of(self, rank: int) -> str:
        parts = self._beats[rank].value.decode(errors="replace").split(" ", 2)
        return parts[2] if len(parts) == 3 else "not started"


class TorchTransport(Transport):
    """One party's endpoint in a gloo process group (already initialised by the caller).

    ``max_frame_bytes`` bounds any frame a peer may announce (the largest valid frame for the
    model's context window); each frame is validated exactly later, by the wire layer.
    """

    def __init__(
        self, rank: int, names: Sequence[str], liveness: Liveness, timeout_s: float, max_frame_bytes: int
    ) -> None:
        super().__init__(rank, names)
        self.liveness = liveness
        self.timeout_s = timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.link_bytes_sent = 0  # what actually crossed the links: one copy per addressee, plus size words
        self._inbox: dict[int, queue.Queue] = {n: queue.Queue() for n in range(self.world_size) if n != rank}
        self._failure: BaseException | None = None
        self._pending: list = []
        self._fault = fault_for(rank)
        self._receiver = threading.Thread(target=self._receive_forever, name="fedattn-receiver", daemon=True)
        self._receiver.start()

    def note(self, phase: str) -> None:
        self.liveness.note(phase)
        if self._fault is not None and phase == self._fault[0]:
            inject(self._fault[1])

    def _deliver(self, frame: bytes, to: Sequence[int]) -> None:
        size, payload = frame_messages(frame)
        for receiver in to:  # the tensors stay referenced until flush() confirms the sends
            try:
                self._pending.append((dist.isend(size, dst=receiver, tag=SIZE_TAG), size))
                self._pending.append((dist.isend(payload, dst=receiver, tag=PAYLOAD_TAG), payload))
            except RuntimeError as error:  # gloo fails a send at once on a link that is already down
                raise self._link_broke(None, f"a frame to reach {self.name_of(receiver)}", error) from None
            self.link_bytes_sent += payload.numel() + size.element_size()

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every frame sent so far has left (before a clean exit)."""
        deadline = datetime.timedelta(seconds=self.timeout_s if timeout_s is None else timeout_s)
        for work, _tensor in self._pending:
            try:
                work.wait(timeout=deadline)
            except RuntimeError as error:
                raise self._link_broke(None, "its sends to complete", error) from None
        self._pending.clear()

    def _take(self, sender: int, what: str) -> bytes:
        return take(self._inbox[sender], lambda: self._check(sender, what))

    def _check(self, sender: int, what: str) -> None:
        """Fail fast, naming the culprit, if the link broke or a peer died or stalled."""
        if isinstance(self._failure, FedAttnError):
            raise type(self._failure)(f"{self._failure}; {self.name_of(self.rank)} was waiting for {what}")
        if self._failure is not None:
            raise self._link_broke(sender, what, self._failure)
        try:
            self.liveness.refresh()
        except Exception:  # noqa: BLE001 - the store itself is unreachable
            raise self._diagnose(sender, what, "") from None
        if any(self.liveness.silent_for(rank) > STALE_AFTER_S for rank in self._inbox):
            raise self._diagnose(sender, what, "")
        if self.liveness.idle_for(sender) > self.timeout_s:
            raise PeerFailure(
                f"{self._who(sender)} made no progress for {self.timeout_s:g} s (it is alive, at "
                f"{self.liveness.phase_of(sender)}); {self.name_of(self.rank)} was waiting for {what}"
            )

    def _link_broke(self, sender: int | None, what: str, error: BaseException) -> PeerFailure:
        """A gloo link failed: name the party that is gone once its heartbeat has gone stale."""
        time.sleep(STALE_AFTER_S)
        return self._diagnose(sender, what, f"the link broke ({_short(error)})")

    def _diagnose(self, sender: int | None, what: str, detail: str) -> PeerFailure:
        waiting = f"{self.name_of(self.rank)} was waiting for {what}"
        if sender is not None:
            waiting += f" from {self.name_of(sender)}"
        try:
            self.liveness.refresh()
        except Exception:  # noqa: BLE001
            return PeerFailure(f"the rendezvous store is unreachable (its host is gone); {waiting}")
        gone = [rank for rank in self._inbox if self.liveness.silent_for(rank) > STALE_AFTER_S]
        if gone:
            names = "; ".join(
                f"{self._who(rank)} is gone (last seen at {self.liveness.phase_of(rank)})" for rank in gone
            )
            return PeerFailure(f"{names}; {waiting}")
        return PeerFailure(f"{waiting}: {detail or 'a peer stopped answering'}")

    def _who(self, rank: int) -> str:
        return f"{self.name_of(rank)} (rank {rank})"

    def _receive_forever(self) -> None:
        size = torch.empty(1, dtype=torch.int64)
        try:
            while True:
                size.fill_(-1)  # a short size message leaves the high bytes set: a negative size
                sender = dist.recv(size, tag=SIZE_TAG)
                length = int(size.item())
                if not 0 < length <= self.max_frame_bytes:
                    raise ProtocolError(
                        f"{self.name_of(sender)} announced a {length}-byte frame; "
                        f"frames are 1..{self.max_frame_bytes} bytes"
                    )
                payload = torch.empty(length + 1, dtype=torch.uint8)
                payload[length] = 0
                dist.recv(payload, src=sender, tag=PAYLOAD_TAG)
                if int(payload[length]) != END_MARK:
                    raise ProtocolError(
                        f"{self.name_of(sender)} sent a truncated frame: "
                        f"fewer bytes than the {length} its size word announced"
                    )
                self._inbox[sender].put(payload[:length].numpy().tobytes())
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            self._failure = error


def connect_store(host: str, port: int, timeout_s: float, serve: bool = False) -> dist.TCPStore:
    """A client of the rendezvous store at ``host:port`` (or, with ``serve``, the store itself),
    within ``timeout_s``; a one-line FedAttnError otherwise.

    torch's own timeout covers a port where nothing listens, but not one held by a program that
    accepts and never answers (the client then waits for its first reply forever): the connection
    is made on a helper thread, and given up ``CONNECT_MARGIN_S`` after torch's timeout.
    """
    outcome = _within(
        timeout_s + CONNECT_MARGIN_S,
        "fedattn-store-connect",
        lambda: dist.TCPStore(
            host, port, is_master=serve, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False
        ),
    )
    if not outcome:
        raise FedAttnError(
            f"{host}:{port} accepted a connection but did not answer as a rendezvous store within "
            f"{timeout_s:g} s: is another program listening on that port?"
        )
    if isinstance(outcome[0], dist.TCPStore):
        return outcome[0]
    if serve and "EADDRINUSE" in str(outcome[0]):
        raise FedAttnError(
            f"cannot serve the rendezvous store on port {port}: the port is in use (by another run?)"
        ) from None
    raise FedAttnError(
        f"cannot reach the rendezvous store at {host}:{port} within {timeout_s:g} s: {_short(outcome[0])}"
    ) from None


def open_process_group(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> None:
    """Form the gloo process group within ``timeout_s`` (a party that joined the rendezvous and died
    before this would otherwise be waited for as long as gloo's own timeout, which must stay
    ``NO_DEADLINE`` because it also bounds every receive of the run)."""
    outcome = _within(
        timeout_s,
        "fedattn-process-group",
        lambda: dist.init_process_group(
            "gloo", store=dist.PrefixStore("fedattn/pg", store), rank=rank, world_size=world_size, timeout=NO_DEADLINE
        ),
    )
    if not outcome:
        raise PeerFailure(f"the gloo links between the parties did not form within {timeout_s:g} s")
    if isinstance(outcome[0], BaseException):
        raise PeerFailure(f"the gloo links between the parties failed to form: {_short(outcome[0])}")


def _within(seconds: float, name: str, call: Callable[[], object]) -> list:
    """``[call()]``, or ``[the RuntimeError or OSError it raised]``, or ``[]`` if it has not returned
    within ``seconds``: torch calls that can wait forever on a peer run on a daemon thread, given up
    after the deadline."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(call())
        except (RuntimeError, OSError) as error:
            outcome.append(error)

    helper = threading.Thread(target=run, name=name, daemon=True)
    helper.start()
    helper.join(seconds)
    return outcome


def frame_messages(frame: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The two messages that carry ``frame``: its int64 size word, then its bytes and ``END_MARK``."""
    payload = bytearray(frame)
    payload.append(END_MARK)
    return torch.tensor([len(frame)], dtype=torch.int64), torch.frombuffer(payload, dtype=torch.uint8)


def _short(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text.split("] ", 1)[-1][:160]
