"""Parties that stay up: a system-neutral service on a party's gRPC node, query after query.

A service holds one ``GrpcNode`` and one ``QueryHandler`` (the system's part, passed in: this layer
imports no system). Queries are started in two phases by their starter, the party that asks (the
last party of the query, which the roster must allow to start):

* ``Start`` {query, system, parties, options}: every other party of the query checks the caller
  (in the roster, ``may_start``, the query's last party), that it is itself in the query and
  serves that system, asks the handler to plan the query from the option words (refusing bad
  ones), and opens the query's ``GrpcTransport`` on its node. A query that gets no ``Go`` within
  its timeout expires.
* ``Go`` {query}: once every party holds the query's state, the starter lets them run; frames for
  a query a node does not hold are refused, so none flows before every party can file it.
* ``Cancel`` {query} stops a query; ``Result`` {query} hands the starter a party's document (the
  handler's per-party report) or its error, once the party is done.
* ``Ask`` {parties, options, input}: only from a caller bearing the service's own name (the
  ``fedattn ask`` client on the starter's host): the service gives the query a random id, starts
  and lets go the others, runs its own party with ``input`` (its private text), collects the
  others' documents and returns the handler's combination of them.

Every body is JSON, at most ``CONTROL_LIMIT`` bytes, with exactly the keys and types expected.
Each query runs in its own thread with its own transport; a query whose peer fails ends with the
named error for that query alone and the service keeps serving. Every service logs exactly one
line per query it took part in (id, parties, bytes, seconds, outcome), never the private text.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from fedattn.errors import EXIT_PEER_FAILURE, EXIT_USAGE, FedAttnError, ProtocolError
from fedattn.network.federation import PartyCredentials, Roster
from fedattn.network.grpc_node import CALLER_OPTIONS, SERVICE, GrpcNode, Refusal, reason
from fedattn.network.grpc_transport import GrpcTransport
from fedattn.network.peers import PeerFailure

SERVICE_TRANSPORT = "gRPC service (mutual TLS)"  # how a service's query reports its transport
CONTROL_LIMIT = 1 << 20  # bytes of a control body (an Ask carries the question)
CONTROL_DEADLINE_S = 10.0  # Start, Go, Cancel
RECONNECT_S = 3.0  # a Start waits this long for an unreachable peer's channel to reconnect
RESULT_GRACE_S = 10.0  # a party's document is awaited this long past the query's timeout
ASK_DEADLINE_S = 3600.0  # the whole of one query, as ``fedattn ask`` waits for it
SERVICE_WORKERS = 32  # concurrent calls: frames, beats and the long Ask and Result calls of queries in flight
QUERY_ID = re.compile(r"[0-9a-f]{32}")
MAX_PARTIES = 64
MAX_WORDS, MAX_WORD = 256, 1024
BODIES = {  # the keys of each control body and their types
    "Start": {"query": str, "system": str, "parties": list, "options": list},
    "Go": {"query": str},
    "Cancel": {"query": str},
    "Result": {"query": str},
    "Ask": {"parties": (list, type(None)), "options": list, "input": dict},
}
# a service's refusals: what the caller asked is wrong (exit 2); any other failed call: the party failed (exit 3)
REFUSALS = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNIMPLEMENTED,
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """What every party of one query is told: its id, the system, the parties in rank order (the
    starter last) and the run's options as words (which the system's handler reads)."""

    id: str
    system: str
    parties: tuple[str, ...]
    options: tuple[str, ...]

    @property
    def starter(self) -> str:
        return self.parties[-1]


@dataclass(frozen=True)
class Plan:
    """What a handler decided for one query before it runs: the transport's timeout and largest
    frame, and the system's own settings."""

    timeout_s: float
    max_frame_bytes: int
    settings: Any


class QueryHandler(Protocol):
    """A system's part of a service (FedAttn: ``systems/fedattn/service.py``)."""

    system: str  # the system's name: a Start for another system is refused
    max_frame_bytes: int  # the largest frame any query can carry (the node's receive limit)

    def plan(self, query: Query, rank: int) -> Plan:
        """Read the option words; raise FedAttnError (one line) to refuse the query."""
        ...

    def run(
        self, query: Query, rank: int, plan: Plan, transport: GrpcTransport, private: dict[str, str] | None
    ) -> dict:
        """This party's whole part of the query over a joined ``transport``; its document (JSON).
        ``private`` is the starter's own input from ``Ask``; other parties bring their own."""
        ...

    def combine(self, query: Query, documents: list[dict]) -> dict:
        """The query's result from every party's document (in rank order), each validated."""
        ...


def asker_text(private: dict[str, str] | None, name: str) -> str:
    """The one text an asker's Ask carries for its own party (``private``), by ``name``: refused
    when missing or beside anything else."""
    private = private or {}
    unknown = set(private) - {name}
    if unknown:
        raise FedAttnError(f"the asker's input has unknown parts: {', '.join(sorted(unknown))}")
    if name not in private:
        raise FedAttnError(f"the asker's input has no {name}")
    return private[name]


@dataclass
class _Served:
    """One query this service takes part in as a party the starter started."""

    query: Query
    rank: int
    plan: Plan
    transport: GrpcTransport
    went: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict = field(default_factory=dict)  # {"document": ...} or {"error": ..., "exit": ...}


class Service:
    """``name``'s service: its node at its roster address, serving ``handler``'s queries until closed."""

    def __init__(self, roster: Roster, name: str, credentials: PartyCredentials, handler: QueryHandler) -> None:
        self.roster, self.name, self.handler = roster, name, handler
        self._served: dict[str, _Served] = {}
        self._lock = threading.Lock()
        limit = max(handler.max_frame_bytes, CONTROL_LIMIT)
        self.node = GrpcNode(name, roster, credentials, limit, control=self._control, workers=SERVICE_WORKERS)

    def close(self) -> None:
        with self._lock:
            served = list(self._served.values())
        for query in served:
            query.transport.close("the service stopped")
        self.node.close()

    # -- control calls ---------------------------------------------------------------------
    def _control(self, method: str, caller: str, body: bytes) -> bytes:
        request = _parse(method, body)
        if method == "Ask":
            if caller != self.name:
                why = f"Ask from {caller}: only {self.name} asks its own service"
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED, why)
            return _dump(self._ask(request))
        if caller == self.name:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method} from its own name {caller}")
        if method == "Start":
            self._start(caller, request)
            return b"{}"
        served = self._of_starter(caller, request["query"], method)
        if method == "Go":
            self._go(served)
            return b"{}"
        if method == "Cancel":
            self._stop_unstarted(served, "cancelled")
            served.transport.close(f"{caller} cancelled it")  # a running query fails, naming why
            return b"{}"
        return _dump(self._result(served))

    def _start(self, caller: str, request: dict) -> None:
        query = Query(request["query"], request["system"], tuple(request["parties"]), tuple(request["options"]))
        if not QUERY_ID.fullmatch(query.id):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "a Start whose query id is not 32 hex digits")
        _check_words(query.options)
        try:
            check_start(self.roster, caller, query.parties)
        except FedAttnError as error:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"a Start: {error}") from None
        if self.name not in query.parties[:-1]:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"a Start from {caller}: {self.name} is not in the query")
        if query.system != self.handler.system:
            why = f"a Start for {query.system[:64]!r}: {self.name} serves {self.handler.system}"
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, why)
        rank = query.parties.index(self.name)
        try:
            plan = self.handler.plan(query, rank)
        except FedAttnError as error:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the query's options: {error}") from None
        with self._lock:
            if query.id in self._served:
                raise Refusal(grpc.StatusCode.ALREADY_EXISTS, "a Start for a query it already holds")
            transport = GrpcTransport.on_node(
                self.node, query.id, rank, query.parties, plan.timeout_s, plan.max_frame_bytes
            )
            served = self._served[query.id] = _Served(query, rank, plan, transport)
        _after(plan.timeout_s, self._expire, served)

    def _of_starter(self, caller: str, query: str, method: str) -> _Served:
        with self._lock:
            served = self._served.get(query)
        if served is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"a {method} for an unknown query")
        if caller != served.query.starter:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"a {method} from {caller}: not the query's starter")
        return served

    def _go(self, served: _Served) -> None:
        with self._lock:
            if served.went or served.done.is_set():
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "a Go for a query already running or ended")
            served.went = True
        threading.Thread(target=self._run, args=(served,), name="fedattn-query", daemon=True).start()

    def _run(self, served: _Served) -> None:
        start = time.monotonic()
        served.reply = self._party(served.query, served.rank, served.plan, served.transport, None)
        self._log(served.query, served.transport, time.monotonic() - start, _outcome(served.reply))
        served.done.set()
        _after(served.plan.timeout_s + RESULT_GRACE_S, self._forget, served)

    def _result(self, served: _Served) -> dict:
        if not served.done.wait(served.plan.timeout_s + RESULT_GRACE_S):
            return {"error": f"{self.name} did not finish the query in time", "exit": EXIT_PEER_FAILURE}
        self._forget(served)
        return served.reply

    def _expire(self, served: _Served) -> None:
        self._stop_unstarted(served, "expired: no Go within the timeout")

    def _stop_unstarted(self, served: _Served, outcome: str) -> None:
        """End a query that never got its Go (cancelled or expired): once, with its log line."""
        with self._lock:
            if served.went or served.done.is_set():
                return
            served.reply = {"error": f"{self.name}: the query {outcome}", "exit": EXIT_PEER_FAILURE}
            served.done.set()
        served.transport.close(outcome)
        self._log(served.query, served.transport, 0.0, outcome)
        self._forget(served)

    def _forget(self, served: _Served) -> None:
        with self._lock:
            if self._served.get(served.query.id) is served:
                del self._served[served.query.id]

    # -- this party's run ------------------------------------------------------------------
    def _party(
        self, query: Query, rank: int, plan: Plan, transport: GrpcTransport, private: dict[str, str] | None
    ) -> dict:
        """Join, run, finish: {"document": ...}, or {"error": ..., "exit": ...} for this query alone."""
        try:
            transport.join()
            document = self.handler.run(query, rank, plan, transport, private)
            transport.finish()
            return {"document": document}
        except FedAttnError as error:
            transport.close(str(error))
            return _failure(error)
        except Exception as error:  # a bug in one query must not stop the service; its text stays out of the log
            transport.close("internal error")
            return {"error": f"{self.name}: internal error ({type(error).__name__})", "exit": EXIT_USAGE}

    # -- the starter -----------------------------------------------------------------------
    def _ask(self, request: dict) -> dict:
        names = self.roster.names
        parties = request["parties"] or [*(name for name in names if name != self.name), self.name]
        query = Query(uuid.uuid4().hex, self.handler.system, tuple(parties), tuple(request["options"]))
        private = request["input"]
        start = time.monotonic()
        try:
            _check_words(query.options)
            if any(not isinstance(value, str) for value in private.values()) or len(private) > 8:
                raise FedAttnError("an Ask's input must be a few texts by name")
            check_start(self.roster, self.name, query.parties)
            plan = self.handler.plan(query, len(parties) - 1)
        except (FedAttnError, Refusal) as error:
            reply = _failure(error)
            self._log(query, None, time.monotonic() - start, _outcome(reply))
            return reply
        transport, reply = None, {}
        started: list[str] = []
        try:
            for peer in query.parties[:-1]:
                self._call(peer, "Start", _start_body(query))
                started.append(peer)
            transport = GrpcTransport.on_node(
                self.node, query.id, len(parties) - 1, parties, plan.timeout_s, plan.max_frame_bytes
            )
            for peer in started:
                self._call(peer, "Go", {"query": query.id})
            reply = self._party(query, len(parties) - 1, plan, transport, private)
            if "error" in reply:
                reply, started = self._cause(query, started, reply), []
            else:
                documents = [self._document(peer, query) for peer in started]
                started = []
                reply = {"document": self.handler.combine(query, [*documents, reply["document"]])}
        except FedAttnError as error:
            reply = _failure(error)
        finally:
            if transport is not None:
                transport.close(reply.get("error", "the query ended"))
            for peer in started if "error" in reply else ():
                self._cancel(peer, query)
        self._log(query, transport, time.monotonic() - start, _outcome(reply))
        return reply

    def _cause(self, query: Query, started: list[str], failure: dict) -> dict:
        """Why the query failed, once every other party is stopped: when this party only saw a peer
        leave (a PeerFailure), a peer's own refusal (a handshake that differs, bad input) says more."""
        for peer in started:
            self._cancel(peer, query)
        if failure["exit"] != EXIT_PEER_FAILURE:
            return failure
        for peer in started:
            try:
                reply = self._call(peer, "Result", {"query": query.id})
            except FedAttnError:
                continue
            if isinstance(reply, dict) and reply.get("exit") == EXIT_USAGE and isinstance(reply.get("error"), str):
                return {"error": reply["error"][:1000], "exit": EXIT_USAGE}
        return failure

    def _document(self, peer: str, query: Query) -> dict:
        reply = self._call(peer, "Result", {"query": query.id}, ASK_DEADLINE_S)
        if not isinstance(reply, dict) or not (set(reply) == {"document"} or set(reply) == {"error", "exit"}):
            raise ProtocolError(f"{peer} answered the query's Result with something else than a result")
        if "error" in reply:
            raise _error_of(reply, limit=1000)
        if not isinstance(reply["document"], dict):
            raise ProtocolError(f"{peer}'s document is not a JSON object")
        return reply["document"]

    def _cancel(self, peer: str, query: Query) -> None:
        try:
            self._call(peer, "Cancel", {"query": query.id})
        except FedAttnError:
            pass  # it may be gone: its own liveness ends its part of the query

    def _call(self, peer: str, method: str, body: dict, deadline_s: float = CONTROL_DEADLINE_S) -> Any:
        """A control call to ``peer``; a Start that finds it unreachable tries once more after the
        channel had time to reconnect (a restarted service is back while our channel backs off)."""
        channel, address = self.node.channel(peer), self.roster.entry(peer).address
        try:
            return call(channel, peer, address, method, body, deadline_s)
        except PeerFailure:
            if method != "Start":
                raise
        try:
            grpc.channel_ready_future(channel).result(timeout=RECONNECT_S)
        except grpc.FutureTimeoutError:
            pass  # the second try says why
        return call(channel, peer, address, method, body, deadline_s)

    def _log(self, query: Query, transport: GrpcTransport | None, seconds: float, outcome: str) -> None:
        sent, received = (transport.stats.bytes_sent, transport.stats.bytes_received) if transport else (0, 0)
        log.info(
            "query %s: parties %s; sent %d B, received %d B; %.2f s; %s",
            query.id,
            ",".join(query.parties),
            sent,
            received,
            seconds,
            outcome,
        )


def check_start(roster: Roster, starter: str, parties: Sequence[str]) -> None:
    """Who may start a query of these parties: a roster party with may_start, as the query's last."""
    if not 2 <= len(parties) <= MAX_PARTIES or any(not isinstance(name, str) for name in parties):
        raise FedAttnError(f"a query has 2 to {MAX_PARTIES} parties by name")
    if len(set(parties)) != len(parties):
        raise FedAttnError("a query names a party twice")
    for name in parties:
        roster.entry(name[:64])
    if not roster.entry(starter).may_start:
        raise FedAttnError(f"{starter} may not start queries (may_start is false in the roster)")
    if parties[-1] != starter:
        raise FedAttnError(f"the starter {starter} must be the query's last party")


def ask(
    roster: Roster,
    name: str,
    credentials: PartyCredentials,
    parties: Sequence[str] | None,
    options: Sequence[str],
    private: dict[str, str],
) -> dict:
    """Ask ``name``'s own service (the caller holds its credentials) to run a query; the combined
    document, or a FedAttnError (a PeerFailure when a party failed or the service is unreachable)."""
    address = roster.entry(name).address
    tls = grpc.ssl_channel_credentials(credentials.ca_pem, credentials.key_pem, credentials.cert_pem)
    channel = grpc.secure_channel(address, tls, options=[*CALLER_OPTIONS, ("grpc.ssl_target_name_override", name)])
    body = {"parties": list(parties) if parties else None, "options": list(options), "input": private}
    try:
        reply = call(channel, f"{name}'s service", address, "Ask", body, ASK_DEADLINE_S)
    finally:
        channel.close()
    if not isinstance(reply, dict) or "document" not in reply and "error" not in reply:
        raise ProtocolError(f"{name}'s service answered with something else than a result")
    if "error" in reply:
        raise _error_of(reply)
    return reply["document"]


def call(channel: grpc.Channel, peer: str, address: str, method: str, body: dict, deadline_s: float) -> Any:
    """One control call; its JSON reply. A refusal is a FedAttnError with the service's words; a
    service that cannot be reached or fails during the call is a PeerFailure."""
    try:
        reply = channel.unary_unary(f"/{SERVICE}/{method}")(_dump(body), timeout=deadline_s)
    except grpc.RpcError as error:
        if error.code() in REFUSALS:
            raise FedAttnError(error.details() or f"{peer} refused the {method}") from None
        raise PeerFailure(f"{peer} at {address}: {reason(error)}") from None
    try:
        return json.loads(reply)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError(f"{peer} answered {method} with something else than JSON") from None


def _parse(method: str, body: bytes) -> dict:
    """A control body: JSON, bounded, with exactly the expected keys of the expected types."""
    if len(body) > CONTROL_LIMIT:
        raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a {method} of {len(body)} bytes (at most {CONTROL_LIMIT})")
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"a {method} that is not JSON") from None
    expected = BODIES[method]
    if not isinstance(request, dict) or set(request) != set(expected):
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"a {method} without exactly the keys {sorted(expected)}")
    for key, kind in expected.items():
        if not isinstance(request[key], kind):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"a {method} whose {key!r} has the wrong type")
    return request


def _check_words(words: Sequence[str]) -> None:
    if len(words) > MAX_WORDS or any(not isinstance(word, str) or len(word) > MAX_WORD for word in words):
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"options must be at most {MAX_WORDS} words, each a string")


def _start_body(query: Query) -> dict:
    return {"query": query.id, "system": query.system, "parties": list(query.parties), "options": list(query.options)}


def _failure(error: Exception) -> dict:
    peer = isinstance(error, (PeerFailure, ProtocolError))
    why = error.why if isinstance(error, Refusal) else str(error)
    return {"error": why, "exit": EXIT_PEER_FAILURE if peer else EXIT_USAGE}


def _error_of(reply: dict, limit: int | None = None) -> FedAttnError:
    """The inverse of ``_failure``: a failed reply as the error it stood for."""
    return (PeerFailure if reply.get("exit") == EXIT_PEER_FAILURE else FedAttnError)(str(reply["error"])[:limit])


def _outcome(reply: dict) -> str:
    return "answered" if "document" in reply else f"failed: {reply['error']}"


def _dump(document: dict) -> bytes:
    return json.dumps(document).encode()


def _after(seconds: float, action, served: _Served) -> None:
    timer = threading.Timer(seconds, action, args=(served,))
    timer.daemon = True
    timer.start()
