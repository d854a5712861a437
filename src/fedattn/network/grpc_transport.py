"""A transport over gRPC with mutual TLS: each party serves at its roster address and dials the others.

Each party's service has two raw-bytes methods (no protobuf, no pickle: a frame is our own bytes,
validated later by the wire layer): ``Deliver`` files one frame in the receiver's inbox for its
sender, and its empty reply says so; ``Beat`` carries the caller's progress and phase, for
liveness. Every link is mutual TLS with the federation's CA as the only root, and identity comes
from certificates alone: the service files a frame under the name in the caller's verified
certificate, whatever the frame says inside, and a caller checks the service's certificate against
the party it means to reach (not merely the address it dialled). So no party can speak as another.

A service refuses a message longer than the run's largest valid frame from gRPC's length prefix,
before allocating it; every call has a deadline and idle connections are pinged (keepalive), so a
dead host is noticed. One sender thread per link makes one call at a time, so frames arrive in the
order they were sent. Like the gloo transport's heartbeats, every party tells every other its
progress and phase, at once when it changes and every half second otherwise: a party not heard
from for ``STALE_AFTER_S`` is named as gone with the phase it was last seen in, and the one awaited
as stalled if it beats but makes no progress for the timeout.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NoReturn

import grpc

from fedattn.errors import FedAttnError
from fedattn.network.federation import PartyCredentials, Roster
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

SERVICE = "fedattn.Link"
GRPC_MESSAGE_PREFIX = 5  # bytes before each gRPC message: a compression flag and a 4-byte length
BEAT_DEADLINE_S = 1.0
CLOSE_GRACE_S = 1.0  # calls in flight when a service stops may still finish
FINISHED = "finished"
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 10_000),  # ping an idle connection every 10 s ...
    ("grpc.keepalive_timeout_ms", 5_000),  # ... and drop it if no answer comes within 5 s
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVICE_OPTIONS = [
    *KEEPALIVE,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),  # accept the callers' keepalive pings
    ("grpc.server_handshake_timeout_ms", 10_000),  # a connection that never completes TLS is dropped
    ("grpc.so_reuseport", 0),  # a port already in use is an error, never shared with another process
]
CALLER_OPTIONS = [
    *KEEPALIVE,
    ("grpc.max_receive_message_length", 1024),  # every reply is empty
    ("grpc.initial_reconnect_backoff_ms", 200),  # a party that starts late is reached soon after
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
# what gRPC's connection errors mean here, for one-line messages
REASONS = (
    ("CERTIFICATE_VERIFY_FAILED", "its certificate is not signed by this federation's CA"),
    ("Hostname Verification", "its certificate does not carry the expected party name"),
    ("Socket closed", "it closed the connection during the TLS handshake (it did not accept this party's certificate)"),
    ("Connection refused", "nothing listens at its address"),
    ("Deadline Exceeded", "no answer before the deadline"),
)
# refusals that waiting cannot cure: join gives up at once (a party still starting is merely unreachable)
FINAL_REASONS = {REASONS[0][1], REASONS[1][1]}
FINAL_CODES = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}

log = logging.getLogger(__name__)


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
    """The calling side of one ordered pair of parties."""

    channel: grpc.Channel
    deliver: grpc.UnaryUnaryMultiCallable
    beat: grpc.UnaryUnaryMultiCallable
    outbox: queue.Queue
    thread: threading.Thread


class GrpcTransport(Transport):
    """One party's endpoint: its service (started here) and its links to every other party.

    ``names`` are this run's parties in rank order, each in the roster; ``credentials`` are this
    party's own. Call ``join`` before the first frame and ``finish`` (or ``close``, on failure) after
    the last. ``max_frame_bytes`` bounds any frame a peer may send (the largest valid frame).
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
        super().__init__(rank, names)
        self.addresses = [roster.entry(name).address for name in self.names]
        self.roster_names = set(roster.names)
        self.timeout_s = timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.link_bytes_sent = 0  # gRPC messages: one copy per addressee, each with its 5-byte prefix
        self._peers = [n for n in range(self.world_size) if n != rank]
        self._inbox: dict[int, queue.Queue] = {n: queue.Queue() for n in self._peers}
        self._beat = (0, "starting")  # (progress, phase): what this party tells the others
        self._changed = threading.Event()
        started = time.monotonic()
        self._views = {n: _View(heard_at=started, progressed_at=started) for n in self._peers}
        self._failure: tuple[int, str] | None = None  # (peer, why) of the first frame a peer did not take
        self._unacked = 0
        self._refused: set[str] = set()
        self._acked = threading.Condition()
        self._closed = threading.Event()
        self._fault = fault_for(rank)  # FEDATTN_INJECT_FAULT, as over gloo
        self._server = self._serve(credentials)
        self._links = {n: self._dial(n, credentials) for n in self._peers}
        for link in self._links.values():
            link.thread.start()
        threading.Thread(target=self._beat_forever, name="fedattn-grpc-beat", daemon=True).start()

    # -- the service -----------------------------------------------------------------------
    def _serve(self, credentials: PartyCredentials) -> grpc.Server:
        server = grpc.server(
            ThreadPoolExecutor(max_workers=2 * self.world_size + 2, thread_name_prefix="fedattn-grpc"),
            options=[*SERVICE_OPTIONS, ("grpc.max_receive_message_length", self.max_frame_bytes)],
        )
        handlers = {
            "Deliver": grpc.unary_unary_rpc_method_handler(self._on_frame),
            "Beat": grpc.unary_unary_rpc_method_handler(self._on_beat),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        own = [(credentials.key_pem, credentials.cert_pem)]
        tls = grpc.ssl_server_credentials(own, root_certificates=credentials.ca_pem, require_client_auth=True)
        address = self.addresses[self.rank]
        try:
            server.add_secure_port(address, tls)
        except RuntimeError:
            raise FedAttnError(f"{self._me} cannot listen on {address}: the address is in use or not here") from None
        server.start()
        return server

    def _on_frame(self, frame: bytes, context: grpc.ServicerContext) -> bytes:
        sender = self._authenticated(context)
        if not frame:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"an empty frame from {self.name_of(sender)}")
        self._inbox[sender].put(frame)
        return b""

    def _on_beat(self, beat: bytes, context: grpc.ServicerContext) -> bytes:
        view, now = self._views[self._authenticated(context)], time.monotonic()
        progress, _, phase = beat.decode(errors="replace").partition(" ")
        if not progress.isdigit() or int(progress) < view.progress:
            return b""  # an older beat overtaken by a newer one (two threads may send)
        view.heard_at, view.phase = now, phase[:100]
        if int(progress) != view.progress:
            view.progress, view.progressed_at = int(progress), now
        return b""

    def _authenticated(self, context: grpc.ServicerContext) -> int:
        """The caller's rank, from the common name in its verified certificate (TLS checked the CA)."""
        names = context.auth_context().get("x509_common_name", [])
        if len(names) != 1:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "a caller without a named certificate")
        name = names[0].decode(errors="replace")
        if name not in self.roster_names:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"{name[:64]!r}: not in the federation's roster")
        if name == self._me:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"a call with its own name {name}")
        if name not in self.names:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"{name}: not a party of this run")
        return self.names.index(name)

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, why: str) -> NoReturn:
        if why not in self._refused:  # once per reason: a caller that keeps trying does not flood the log
            self._refused.add(why)
            log.warning("%s refused a call from %s: %s", self._me, context.peer(), why)
        context.abort(code, f"{self._me} refused {why}")

    # -- the links -------------------------------------------------------------------------
    def _dial(self, peer: int, credentials: PartyCredentials) -> _Link:
        tls = grpc.ssl_channel_credentials(credentials.ca_pem, credentials.key_pem, credentials.cert_pem)
        # the service must prove it is ``peer``: its certificate is checked against the party's name
        options = [*CALLER_OPTIONS, ("grpc.ssl_target_name_override", self.name_of(peer))]
        channel = grpc.secure_channel(self.addresses[peer], tls, options=options)
        thread = threading.Thread(target=self._send_forever, args=(peer,), name="fedattn-grpc-send", daemon=True)
        link = _Link(
            channel=channel,
            deliver=channel.unary_unary(f"/{SERVICE}/Deliver"),
            beat=channel.unary_unary(f"/{SERVICE}/Beat"),
            outbox=queue.Queue(),
            thread=thread,
        )
        return link

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
                link.deliver(frame, timeout=self.timeout_s)
            except (grpc.RpcError, ValueError) as error:  # ValueError: close() shut the channel meanwhile
                if not self._closed.is_set():
                    with self._acked:
                        self._failure = self._failure or (peer, _reason(error))
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
            self._links[peer].beat(f"{progress} {phase}".encode(), timeout=BEAT_DEADLINE_S)
        except grpc.RpcError as error:
            view.error = _reason(error)
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

    def close(self) -> None:
        """Stop the links and the service (calls in flight get ``CLOSE_GRACE_S``); frames not yet
        sent are dropped."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._changed.set()  # wakes the beat thread, which then stops
        for link in self._links.values():
            link.outbox.put(None)
        for link in self._links.values():
            link.channel.close()
        self._server.stop(CLOSE_GRACE_S).wait()

    @property
    def _me(self) -> str:
        return self.name_of(self.rank)

    def _who(self, rank: int) -> str:
        return f"{self.name_of(rank)} (rank {rank})"


def _reason(error: grpc.RpcError) -> str:
    """One line for a failed call: our service's own refusal, or what a connection error means."""
    if error.code() == grpc.StatusCode.CANCELLED:
        return "its service stopped during the call"
    details = (error.details() or "").split("last error: ")[-1]
    for pattern, meaning in REASONS:
        if pattern in details:
            return meaning
    text = re.sub(r"^[A-Z_]+: (ipv[46]:\S+: )?", "", details)
    return f"{error.code().name}: {text[:200]}"
