"""One query's view of a party's gRPC node: its inboxes, its liveness, and its end.

A ``GrpcNode`` (``grpc_node``) owns the mutual-TLS service, the channels and the authentication; a
``GrpcTransport`` is what one query sees of it: the query's frames, filed by the node under the
name in the caller's verified certificate (whatever the frame says inside) and the query id in the
call's metadata, and this query's links to the other parties. ``GrpcTransport(rank, names, roster,
credentials, timeout_s, max_frame_bytes)`` makes a private node that serves this one query (one
process per party and query, as ``fedattn participant`` runs); a long-lived service makes one view
per query on its node with ``GrpcTransport.on_node``.

A caller checks the service's certificate against the party it means to reach (not merely the
address it dialled), so no party can speak as another. A frame longer than the query's largest
valid frame is refused. One sender thread per link makes one call at a time, so frames arrive in
the order they were sent. Like the gloo transport's heartbeats, every party tells every other its
progress and phase for this query, at once when it changes and every half second otherwise: a party
not heard from for ``STALE_AFTER_S`` is named as gone with the phase it was last seen in, and the
one awaited as stalled if it beats but makes no progress for the timeout.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from fedattn.network.federation import PartyCredentials, Roster
from fedattn.network.grpc_node import (
    FINAL_CODES,
    FINAL_REASONS,
    GRPC_MESSAGE_PREFIX,
    QUERY_KEY,
    SERVICE,
    GrpcNode,
    Refusal,
    reason,
)
from fedattn.network.peers import (
    BEAT_INTERVAL_S,
    MIN_BEAT_GAP_S,
    POLL_S,
    STALE_AFTER_S,
    PeerFailure,
    fault_for,
    inject,
    take,
)
from fedattn.network.transport import Transport

__all__ = ["GRPC_MESSAGE_PREFIX", "MIN_BEAT_GAP_S", "SERVICE", "STALE_AFTER_S", "GrpcTransport"]

BEAT_DEADLINE_S = 1.0
FINISHED = "finished"
PRIVATE_QUERY = ""  # the one query a private node serves: calls without a query id


@dataclass
class _View:
    """What a party knows of a peer: what the peer's last beat said, when (monotonic, our own clock),
    and why this party's last call to it failed."""

    phase: str = "not started"
    progress: int = -1
    heard_at: float = 0.0
    progressed_at: float = 0.0
    error: str = ""
    refused: bool = False  # ... the error is a refusal that waiting cannot cure


@dataclass
class _Link:
    """The calling side of one ordered pair of parties, for one query."""

    deliver: grpc.UnaryUnaryMultiCallable
    beat: grpc.UnaryUnaryMultiCallable
    outbox: queue.Queue
    thread: threading.Thread


class GrpcTransport(Transport):
    """One party's endpoint for one query: its inboxes on a node and its links to every other party.

    ``names`` are the query's parties in rank order, each in the roster; ``credentials`` are this
    party's own. Call ``join`` before the first frame and ``finish`` (or ``close``, on failure) after
    the last. ``max_frame_bytes`` bounds any frame a peer may send (the largest valid frame).
    This constructor makes a private node for this one query (closed with it); ``on_node`` makes a
    view on a node that serves many.
    """

    def __init__(
        self,
        rank: int,
        names: Sequence[str],
        roster: Roster,
        credentials: PartyCredentials,
        timeout_s: float,
        max_frame_bytes: int,
    ) -> None:
        for name in names:
            roster.entry(name)
        node = GrpcNode(names[rank], roster, credentials, max_frame_bytes, workers=2 * len(names) + 2)
        self._attach(node, PRIVATE_QUERY, rank, names, timeout_s, max_frame_bytes, owns_node=True)

    @classmethod
    def on_node(
        cls, node: GrpcNode, query: str, rank: int, names: Sequence[str], timeout_s: float, max_frame_bytes: int
    ) -> GrpcTransport:
        """Query ``query``'s view on a long-lived ``node`` (whose party is ``names[rank]``): from now
        on the node files this query's frames here; ``close`` hands the query back, not the node."""
        if node.name != names[rank]:
            raise ValueError(f"the node of {node.name} cannot be rank {rank} ({names[rank]}) of a query")
        transport = cls.__new__(cls)
        transport._attach(node, query, rank, names, timeout_s, max_frame_bytes, owns_node=False)
        return transport

    def _attach(
        self,
        node: GrpcNode,
        query: str,
        rank: int,
        names: Sequence[str],
        timeout_s: float,
        max_frame_bytes: int,
        owns_node: bool,
    ) -> None:
        super().__init__(rank, names)
        self.addresses = [node.roster.entry(name).address for name in self.names]
        self.timeout_s = timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.link_bytes_sent = 0  # gRPC messages: one copy per addressee, each with its 5-byte prefix
        self._node, self._query, self._owns_node = node, query, owns_node
        self._metadata = ((QUERY_KEY, query),) if query else None
        self._peers = [n for n in range(self.world_size) if n != rank]
        self._inbox: dict[int, queue.Queue] = {n: queue.Queue() for n in self._peers}
        self._beat = (0, "starting")  # (progress, phase): what this party tells the others
        self._changed = threading.Event()
        started = time.monotonic()
        self._views = {n: _View(heard_at=started, progressed_at=started) for n in self._peers}
        self._failure: tuple[int, str] | None = None  # (peer, why) of the first frame a peer did not take
        self._unacked = 0
        self._acked = threading.Condition()
        self._closed = threading.Event()
        self._closed_because = ""
        self._fault = fault_for(rank)  # FEDATTN_INJECT_FAULT, as over gloo
        self._links = {n: self._dial(n) for n in self._peers}
        node.register(query, self)
        for link in self._links.values():
            link.thread.start()
        self._beating = threading.Thread(target=self._beat_forever, name="fedattn-grpc-beat", daemon=True)
        if owns_node:  # a private node beats from the start; a query on a shared node from join (after Go)
            self._beating.start()

    # -- what the node files here ----------------------------------------------------------
    def on_frame(self, caller: str, frame: bytes) -> None:
        sender = self._party(caller)
        if not frame:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"an empty frame from {caller}")
        if len(frame) > self.max_frame_bytes:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a frame of {len(frame)} bytes from {caller}: the query's largest is {self.max_frame_bytes}",
            )
        self._inbox[sender].put(frame)

    def on_beat(self, caller: str, beat: bytes) -> None:
        view, now = self._views[self._party(caller)], time.monotonic()
        progress, _, phase = beat.decode(errors="replace").partition(" ")
        if not progress.isdigit() or int(progress) < view.progress:
            return  # an older beat overtaken by a newer one (two threads may send)
        view.heard_at, view.phase = now, phase[:100]
        if int(progress) != view.progress:
            view.progress, view.progressed_at = int(progress), now

    def _party(self, caller: str) -> int:
        """The caller's rank in this query (the node has checked its certificate and the roster)."""
        if caller not in self.names:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{caller}: not a party of this run")
        return self.names.index(caller)

    # -- the links -------------------------------------------------------------------------
    def _dial(self, peer: int) -> _Link:
        channel = self._node.channel(self.name_of(peer))
        thread = threading.Thread(target=self._send_forever, args=(peer,), name="fedattn-grpc-send", daemon=True)
        return _Link(
            deliver=channel.unary_unary(f"/{SERVICE}/Deliver"),
            beat=channel.unary_unary(f"/{SERVICE}/Beat"),
            outbox=queue.Queue(),
            thread=thread,
        )

    def _deliver(self, frame: bytes, to: Sequence[int]) -> None:
        if self._failure is not None:
            raise self._link_failure("its frames to be taken")
        for receiver in to:
            if receiver not in self._links:
                raise ValueError(f"invalid addressee {receiver} for party {self.rank}")
        for receiver in to:
            with self._acked:
                self._unacked += 1
            self._links[receiver].outbox.put(frame)
            self.link_bytes_sent += len(frame) + GRPC_MESSAGE_PREFIX

    def _send_forever(self, peer: int) -> None:
        """One call at a time on this link, so frames arrive in the order they were sent."""
        link = self._links[peer]
        while (frame := link.outbox.get()) is not None:
            try:
                link.deliver(frame, timeout=self.timeout_s, metadata=self._metadata)
            except (grpc.RpcError, ValueError) as error:  # ValueError: close() shut the channel meanwhile
                if not self._closed.is_set():
                    with self._acked:
                        self._failure = self._failure or (peer, reason(error))
                        self._acked.notify_all()
                return
            with self._acked:
                self._unacked -= 1
                self._acked.notify_all()

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every peer has taken every frame sent to it so far."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._acked:
            while self._unacked and self._failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerFailure(f"{self._unacked} frames of {self._me} were not taken within the deadline")
                self._acked.wait(left)
        if self._failure is not None:
            raise self._link_failure("its frames to be taken")

    def _link_failure(self, what: str) -> PeerFailure:
        peer, why = self._failure
        if not self._tell(peer) and self._views[peer].phase != FINISHED:
            return PeerFailure(f"{self._gone(peer)}; {self._me} was waiting for {what}")
        return PeerFailure(f"{self._who(peer)} did not take a frame from {self._me}: {why}")

    # -- liveness --------------------------------------------------------------------------
    def note(self, phase: str) -> None:
        self._beat = (self._beat[0] + 1, phase)
        self._changed.set()
        if self._fault is not None and phase == self._fault[0]:
            inject(self._fault[1])

    def join(self) -> None:
        """Wait until this party has reached every other over mutual TLS and heard from it (each
        may still be starting)."""
        if self._beating.ident is None:  # not started yet
            self._beating.start()
        deadline = time.monotonic() + self.timeout_s
        waiting = list(self._peers)
        while waiting:
            waiting = [peer for peer in waiting if not self._tell(peer) or self._views[peer].progress < 0]
            refused = [peer for peer in waiting if self._views[peer].refused]
            if waiting and (refused or time.monotonic() > deadline):
                missing = "; ".join(
                    f"{self._who(peer)} at {self.addresses[peer]}: {self._views[peer].error or 'not heard from'}"
                    for peer in refused or waiting
                )
                within = "" if refused else f" within {self.timeout_s:g} s"
                raise PeerFailure(f"{self._me} could not join every party{within}: {missing}")
            if waiting:
                time.sleep(POLL_S)
        self.note("joined")

    def _beat_forever(self) -> None:
        while not self._closed.is_set():
            self._changed.clear()
            for peer in self._peers:
                self._tell(peer)
            self._changed.wait(BEAT_INTERVAL_S)
            self._closed.wait(MIN_BEAT_GAP_S)

    def _tell(self, peer: int) -> bool:
        """One beat to ``peer``: True if it took it (if not, its view keeps why)."""
        view = self._views[peer]
        progress, phase = self._beat
        try:
            self._links[peer].beat(f"{progress} {phase}".encode(), timeout=BEAT_DEADLINE_S, metadata=self._metadata)
        except grpc.RpcError as error:
            view.error = reason(error)
            view.refused = error.code() in FINAL_CODES or view.error in FINAL_REASONS
            return False
        except ValueError:  # close() shut the channel meanwhile
            return False
        view.error, view.refused = "", False
        return True

    def _take(self, sender: int, what: str) -> bytes:
        return take(self._inbox[sender], lambda: self._check(sender, what))

    def _check(self, sender: int, what: str) -> None:
        """Fail, naming the culprit, if a link broke, a peer is gone, or the awaited one stalled."""
        waiting = f"{self._me} was waiting for {what} from {self.name_of(sender)}"
        if self._closed.is_set():
            raise PeerFailure(f"{self._me} stopped this query ({self._closed_because or 'closed'}); {waiting}")
        if self._failure is not None:
            raise self._link_failure(f"{what} from {self.name_of(sender)}")
        gone = [peer for peer in self._peers if self._is_gone(peer)]
        if gone:
            raise PeerFailure(f"{'; '.join(self._gone(peer) for peer in gone)}; {waiting}")
        view = self._views[sender]
        if time.monotonic() - view.progressed_at > self.timeout_s:
            raise PeerFailure(
                f"{self._who(sender)} made no progress for {self.timeout_s:g} s (it is alive, at {view.phase}); "
                f"{waiting}"
            )

    def _is_gone(self, peer: int) -> bool:
        view = self._views[peer]
        return view.phase != FINISHED and time.monotonic() - view.heard_at > STALE_AFTER_S

    def _gone(self, peer: int) -> str:
        view = self._views[peer]
        return f"{self._who(peer)} is gone (last seen at {view.phase})" + (f": {view.error}" if view.error else "")

    # -- the end ---------------------------------------------------------------------------
    def finish(self) -> None:
        """After a successful run: flush, tell every peer this party finished, then keep serving
        until each has finished too (or is gone, or stopped making progress), so that no peer sees
        this one vanish while it still works."""
        try:
            self.flush()
            self.note(FINISHED)
            for peer in self._peers:  # directly, not by the beat thread: it must arrive before we leave
                self._tell(peer)
            while any(self._still_working(peer) for peer in self._peers):
                time.sleep(POLL_S)
        finally:
            self.close()

    def _still_working(self, peer: int) -> bool:
        view = self._views[peer]
        progressing = time.monotonic() - view.progressed_at <= self.timeout_s
        return view.phase != FINISHED and not self._is_gone(peer) and progressing

    def close(self, because: str = "") -> None:
        """Stop this query's links and hand the query back to the node (a private node stops too;
        calls in flight get its grace); frames not yet sent are dropped. A party still waiting for
        a frame is told ``because``."""
        if self._closed.is_set():
            return
        self._closed_because = because
        self._closed.set()
        self._changed.set()  # wakes the beat thread, which then stops
        for link in self._links.values():
            link.outbox.put(None)
        self._node.unregister(self._query)
        if self._owns_node:
            self._node.close()

    @property
    def _me(self) -> str:
        return self.name_of(self.rank)

    def _who(self, rank: int) -> str:
        return f"{self.name_of(rank)} (rank {rank})"
