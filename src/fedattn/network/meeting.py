"""How the parties of a networked run meet, whatever system they run: one process per party.

Two ways, one party: over gloo (``Rendezvous``) start-up connects to the rendezvous store,
publishes heartbeats, waits (with a deadline) until every rank has joined, then opens the gloo
process group; over gRPC with mutual TLS (``FederationRun``) the party serves at its roster address
and joins once it has reached every other. ``links`` is both, as one context manager: on success it
waits until every party has finished before closing, so no party's exit looks like a crash to one
still working. What the parties then say to each other is their system's.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist

from fedattn.errors import EXIT_PEER_FAILURE, EXIT_USAGE, FedAttnError
from fedattn.network.federation import PartyCredentials, Roster
from fedattn.network.grpc_transport import GrpcTransport
from fedattn.network.peers import PeerFailure
from fedattn.network.torch_transport import Liveness, TorchTransport, connect_store, open_process_group

TRANSPORT = "torch (gloo)"
GRPC_TRANSPORT = "gRPC (mutual TLS)"

STORE_POLL_S = 0.1
LEAVE_GRACE_S = 5.0
FAILURE_FLUSH_S = 2.0
STORE_ERRORS = (RuntimeError, OSError)  # torch's store errors (DistError) are RuntimeErrors

NetworkTransport = TorchTransport | GrpcTransport


@dataclass(frozen=True)
class Rendezvous:
    host: str
    port: int
    rank: int
    world_size: int
    host_store: bool  # this process serves the store (rank 0 unless a launcher or torchrun does)
    timeout_s: float


@dataclass(frozen=True)
class FederationRun:
    """This party's place in a run over a federation's gRPC links: the run's parties in rank order
    (each in the roster; the last starts the query), this party's rank and its own credentials."""

    roster: Roster
    names: tuple[str, ...]
    rank: int
    credentials: PartyCredentials
    timeout_s: float

    @property
    def world_size(self) -> int:
        return len(self.names)


@contextmanager
def links(
    meeting: Rendezvous | FederationRun, names: list[str], max_frame_bytes: int
) -> Iterator[tuple[NetworkTransport, str]]:
    """This party's joined transport and its label (for the report), over gloo at a rendezvous or
    over gRPC in a federation. ``names`` are the run's parties in rank order as its system names
    them: the gloo links take them (the network layer knows no system's naming); a federation's
    parties are its roster's names (``FederationRun.names``). ``max_frame_bytes`` bounds any frame
    a peer may send. On success every party finishes together; on failure the links close at once."""
    if isinstance(meeting, FederationRun):
        with _grpc_links(meeting, max_frame_bytes) as transport:
            yield transport, GRPC_TRANSPORT
    else:
        with _gloo_links(meeting, names, max_frame_bytes) as transport:
            yield transport, TRANSPORT


@contextmanager
def _gloo_links(rendezvous: Rendezvous, names: list[str], max_frame: int) -> Iterator[TorchTransport]:
    """The gloo process group, joined at the rendezvous store; on success, every rank finishes together."""
    store = _connect_store(rendezvous)
    liveness = Liveness(rendezvous.host, rendezvous.port, rendezvous.rank, rendezvous.world_size)
    _barrier(store, "joined", rendezvous, names, "join the rendezvous")
    open_process_group(store, rendezvous.rank, rendezvous.world_size, rendezvous.timeout_s)
    transport = TorchTransport(rendezvous.rank, names, liveness, rendezvous.timeout_s, max_frame)
    try:
        yield transport
        transport.note("finished")
        _barrier(store, "finished", rendezvous, names, "finish")
    finally:
        liveness.stop()
        _leave(store, rendezvous, list(range(rendezvous.world_size)))


@contextmanager
def _grpc_links(run: FederationRun, max_frame: int) -> Iterator[GrpcTransport]:
    """This party's gRPC service and its mutual-TLS links to every other party of the run."""
    transport = GrpcTransport(run.rank, run.names, run.roster, run.credentials, run.timeout_s, max_frame)
    try:
        transport.join()
        yield transport
    except BaseException:
        transport.close()
        raise
    transport.finish()


def flush_before_failing(transport: NetworkTransport) -> None:
    """Let what this party already sent (its handshake, say) reach the others, so that they fail
    for the real reason rather than on a closed link; briefly, and never masking our own error."""
    try:
        transport.flush(timeout_s=FAILURE_FLUSH_S)
    except FedAttnError:
        pass


def _connect_store(rendezvous: Rendezvous) -> dist.TCPStore:
    """Reach (or serve) the rendezvous store, then claim the run's world size and this rank in it.
    A party given another --world-size is refused at once, and so are the ranks waiting for it (the
    run cannot form); a second process with a rank already claimed is refused alone (the run goes
    on with the first)."""
    store = connect_store(rendezvous.host, rendezvous.port, rendezvous.timeout_s, serve=rendezvous.host_store)
    where = f"{rendezvous.host}:{rendezvous.port}"
    try:
        announced = str(rendezvous.world_size)
        agreed = store.compare_set("fedattn/world-size", "", announced).decode(errors="replace")
        if agreed != announced:
            refusal = FedAttnError(
                f"rank {rendezvous.rank} was started with --world-size {announced}, but the run at {where} "
                f"has --world-size {agreed}: every party must give the same"
            )
            _abort(store, rendezvous, "joined", refusal)
            raise refusal
        if store.add(f"fedattn/rank/{rendezvous.rank}", 1) > 1:
            raise FedAttnError(
                f"rank {rendezvous.rank} joined the rendezvous at {where} twice: two parties were given "
                f"--rank {rendezvous.rank}, or a second run uses the same store"
            )
    except STORE_ERRORS as error:
        raise PeerFailure(f"the rendezvous store at {where} failed: {str(error).splitlines()[0][:120]}") from None
    return store


def _barrier(store: dist.TCPStore, name: str, rendezvous: Rendezvous, names: list[str], doing: str) -> None:
    """Every rank sets its key, then waits for all; missing ranks are named after the deadline. A
    rank that gives up leaves its cause in the store, so that every other waiting rank exits with
    the same cause instead of waiting for it."""
    keys = [f"fedattn/{name}/{rank}" for rank in range(rendezvous.world_size)]
    abort_key = f"fedattn/abort/{name}"
    deadline = time.monotonic() + rendezvous.timeout_s
    missing = [f"{names[rank]} (rank {rank})" for rank in range(rendezvous.world_size) if rank != rendezvous.rank]
    try:
        store.set(keys[rendezvous.rank], "1")
        while missing:
            missing = [f"{names[rank]} (rank {rank})" for rank, key in enumerate(keys) if not store.check([key])]
            if not missing:
                return
            if store.check([abort_key]):
                code, _, cause = store.get(abort_key).decode(errors="replace").partition(" ")
                raise (PeerFailure if code == str(EXIT_PEER_FAILURE) else FedAttnError)(cause)
            if time.monotonic() > deadline:
                raise PeerFailure(f"{', '.join(missing)} did not {doing} within {rendezvous.timeout_s:g} s")
            time.sleep(STORE_POLL_S)
    except FedAttnError as failure:
        _abort(store, rendezvous, name, failure)
        raise
    except STORE_ERRORS:
        raise PeerFailure(
            f"the rendezvous store at {rendezvous.host}:{rendezvous.port} is gone (its host exited); "
            f"{names[rendezvous.rank]} was waiting for {', '.join(missing)} to {doing}"
        ) from None


def _abort(store: dist.TCPStore, rendezvous: Rendezvous, barrier: str, failure: FedAttnError) -> None:
    """Leave ``failure`` as the cause of ``barrier`` (the first cause stays), then leave after every
    rank that claimed its place (it reads the cause at its next poll); never raises: the store may
    be gone already."""
    code = EXIT_PEER_FAILURE if isinstance(failure, PeerFailure) else EXIT_USAGE
    try:
        store.compare_set(f"fedattn/abort/{barrier}", "", f"{code} {failure}")
        claimed = [rank for rank in range(rendezvous.world_size) if store.check([f"fedattn/rank/{rank}"])]
    except STORE_ERRORS:
        return
    _leave(store, rendezvous, claimed)


def _leave(store: dist.TCPStore, rendezvous: Rendezvous, ranks: list[int]) -> None:
    """The store's host leaves last (after ``ranks``, within a grace period), so nobody loses the
    store while still using it."""
    try:
        store.set(f"fedattn/left/{rendezvous.rank}", "1")
        keys = [f"fedattn/left/{rank}" for rank in ranks]
        deadline = time.monotonic() + LEAVE_GRACE_S
        while rendezvous.host_store and not store.check(keys) and time.monotonic() < deadline:
            time.sleep(STORE_POLL_S)
    except STORE_ERRORS:  # the store's host is gone: nobody is left to wait for
        pass


def exit_now(code: int) -> None:
    """Leave without running gloo's teardown (it can block on a peer that is already gone)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
