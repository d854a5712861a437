"""One party's long-lived gRPC node: its mutual-TLS service, its channels to the other parties, and
who is calling.

A node outlives queries. It serves at the party's roster address, authenticates every caller by
the common name of its verified certificate (TLS checked the federation's CA; the name must be in
the roster), and files what arrives by query: ``Deliver`` (one frame) and ``Beat`` (progress and
phase) carry the query id in the call's metadata (``fedattn-query``), so a frame stays our own
bytes, validated later by the wire layer, and never says which query it belongs to. A call for a
query the node does not hold is refused. Each query registers an endpoint (a ``GrpcTransport``, the
query's view) that takes its frames and beats. Control calls (``CONTROL_METHODS``) go, with the
caller's name, to the control function a service installs; the node knows no system and no
query's meaning.

The channels to peers are made once per peer and shared by every query; gRPC reconnects one by
itself (backoff at most a second), so a peer whose service was restarted at the same address is
reached again by the next call.

Every call has a deadline (set by the caller), idle connections are pinged (keepalive), and a
message longer than the node's limit is refused by gRPC from its length prefix, before allocation.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn, Protocol

import grpc

from fedattn.errors import FedAttnError
from fedattn.network.federation import PartyCredentials, Roster

SERVICE = "fedattn.Link"
QUERY_KEY = "fedattn-query"  # call metadata: the query a frame or beat belongs to
CONTROL_METHODS = ("Start", "Go", "Cancel", "Result", "Ask")
GRPC_MESSAGE_PREFIX = 5  # bytes before each gRPC message: a compression flag and a 4-byte length
CLOSE_GRACE_S = 1.0  # calls in flight when a service stops may still finish
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
REPLY_LIMIT = 64 << 20  # a control reply (a run's report) is at most this long
CALLER_OPTIONS = [
    *KEEPALIVE,
    ("grpc.max_receive_message_length", REPLY_LIMIT),
    ("grpc.initial_reconnect_backoff_ms", 200),  # a party that starts late (or again) is reached soon after
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
    ("for an unknown query", "it does not hold the query (it has left it)"),
)
# refusals that waiting cannot cure: join gives up at once (a party still starting is merely unreachable;
# every party of a service's query holds it before any joins, so one that does not hold it has left)
FINAL_REASONS = {REASONS[0][1], REASONS[1][1]}
FINAL_CODES = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND}

log = logging.getLogger(__name__)


class Refusal(Exception):
    """Raised by a query endpoint or a control function: the call is refused with this status and reason
    (one line, naming parties and queries, never private text)."""

    def __init__(self, code: grpc.StatusCode, why: str, quiet: bool = False) -> None:
        super().__init__(why)
        self.code = code
        self.why = why
        self.quiet = quiet  # expected in normal operation: not logged


class QueryEndpoint(Protocol):
    """What a node hands a query's frames and beats to (the caller is already authenticated)."""

    def on_frame(self, caller: str, frame: bytes) -> None: ...

    def on_beat(self, caller: str, beat: bytes) -> None: ...


Control = Callable[[str, str, bytes], bytes]  # (method, caller's name, body) -> reply


class GrpcNode:
    """A party's service at its roster address and its channels to the other parties.

    ``name`` is the party this node speaks for (its certificate should carry it); ``max_receive_bytes``
    bounds any message a caller may send; ``control`` answers the control calls (none: refused).
    """

    def __init__(
        self,
        name: str,
        roster: Roster,
        credentials: PartyCredentials,
        max_receive_bytes: int,
        control: Control | None = None,
        workers: int = 8,
    ) -> None:
        self.name = name
        self.roster = roster
        self.address = roster.entry(name).address
        self._credentials = credentials
        self._control = control
        self._endpoints: dict[str, QueryEndpoint] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._refused: set[str] = set()
        self._closed = False
        self._server = self._serve(max_receive_bytes, workers)

    # -- the service -----------------------------------------------------------------------
    def _serve(self, max_receive_bytes: int, workers: int) -> grpc.Server:
        server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedattn-grpc"),
            options=[*SERVICE_OPTIONS, ("grpc.max_receive_message_length", max_receive_bytes)],
        )
        handlers = {
            "Deliver": grpc.unary_unary_rpc_method_handler(self._on_frame),
            "Beat": grpc.unary_unary_rpc_method_handler(self._on_beat),
        }
        for method in CONTROL_METHODS:
            handlers[method] = grpc.unary_unary_rpc_method_handler(self._controlled(method))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        credentials = self._credentials
        own = [(credentials.key_pem, credentials.cert_pem)]
        tls = grpc.ssl_server_credentials(own, root_certificates=credentials.ca_pem, require_client_auth=True)
        try:
            server.add_secure_port(self.address, tls)
        except RuntimeError:
            where = f"{self.name} cannot listen on {self.address}"
            raise FedAttnError(f"{where}: the address is in use or not here") from None
        server.start()
        return server

    def _on_frame(self, frame: bytes, context: grpc.ServicerContext) -> bytes:
        caller = self._authenticated(context)
        self._call(context, lambda: self._endpoint(context, "a frame").on_frame(caller, frame))
        return b""

    def _on_beat(self, beat: bytes, context: grpc.ServicerContext) -> bytes:
        caller = self._authenticated(context)
        self._call(context, lambda: self._endpoint(context, "a beat").on_beat(caller, beat))
        return b""

    def _controlled(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def answer(body: bytes, context: grpc.ServicerContext) -> bytes:
            caller = self._authenticated(context, may_be_self=True)
            if self._control is None:
                self._refuse(context, grpc.StatusCode.UNIMPLEMENTED, f"{method} from {caller}: it serves no queries")
            return self._call(context, lambda: self._control(method, caller, body))

        return answer

    def _call(self, context: grpc.ServicerContext, action: Callable[[], bytes | None]) -> bytes:
        try:
            return action() or b""
        except Refusal as refusal:
            self._refuse(context, refusal.code, refusal.why, refusal.quiet)

    def _endpoint(self, context: grpc.ServicerContext, what: str) -> QueryEndpoint:
        query = dict(context.invocation_metadata()).get(QUERY_KEY, "")
        endpoint = self._endpoints.get(query)
        if endpoint is None:
            # a beat may trail its query's end at a peer that finished first
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"{what} for an unknown query", quiet=what == "a beat")
        return endpoint

    def _authenticated(self, context: grpc.ServicerContext, may_be_self: bool = False) -> str:
        """The caller's name, from the common name in its verified certificate (TLS checked the CA)."""
        names = context.auth_context().get("x509_common_name", [])
        if len(names) != 1:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "a caller without a named certificate")
        name = names[0].decode(errors="replace")
        if name not in self.roster.names:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"{name[:64]!r}: not in the federation's roster")
        if name == self.name and not may_be_self:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"a call with its own name {name}")
        return name

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, why: str, quiet: bool = False) -> NoReturn:
        if not quiet and why not in self._refused:  # once per reason: a caller that keeps trying does not flood the log
            self._refused.add(why)
            log.warning("%s refused a call from %s: %s", self.name, context.peer(), why)
        context.abort(code, f"{self.name} refused {why}")

    # -- queries ---------------------------------------------------------------------------
    def register(self, query: str, endpoint: QueryEndpoint) -> None:
        """From now on this node takes ``query``'s frames and beats, for ``endpoint``."""
        with self._lock:
            if query in self._endpoints:
                raise FedAttnError(f"{self.name} already holds that query")
            self._endpoints[query] = endpoint

    def unregister(self, query: str) -> None:
        with self._lock:
            self._endpoints.pop(query, None)

    # -- the channels ----------------------------------------------------------------------
    def channel(self, peer: str) -> grpc.Channel:
        """The one channel to ``peer``'s service; its certificate must carry ``peer`` (not merely
        answer at the address dialled)."""
        with self._lock:
            if self._closed:
                raise ValueError("the node is closed")
            if peer not in self._channels:
                credentials = self._credentials
                tls = grpc.ssl_channel_credentials(credentials.ca_pem, credentials.key_pem, credentials.cert_pem)
                options = [*CALLER_OPTIONS, ("grpc.ssl_target_name_override", peer)]
                self._channels[peer] = grpc.secure_channel(self.roster.entry(peer).address, tls, options=options)
            return self._channels[peer]

    def close(self) -> None:
        """Stop the channels and the service (calls in flight get ``CLOSE_GRACE_S``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channels = list(self._channels.values())
        for channel in channels:
            channel.close()
        self._server.stop(CLOSE_GRACE_S).wait()


def reason(error: grpc.RpcError) -> str:
    """One line for a failed call: our service's own refusal, or what a connection error means."""
    if error.code() == grpc.StatusCode.CANCELLED:
        return "its service stopped during the call"
    details = (error.details() or "").split("last error: ")[-1]
    for pattern, meaning in REASONS:
        if pattern in details:
            return meaning
    text = re.sub(r"^[A-Z_]+: (ipv[46]:\S+: )?", "", details)
    return f"{error.code().name}: {text[:200]}"
