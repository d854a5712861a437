"""Running FedSEA with the server and its clients in this process (the embedded default).

The parties share nothing but the in-process grid: each client keeps its prompt, answer and the KV
cache of its blocks, the server the KV cache of its blocks per session, and every hidden state
crosses as a validated frame, so traffic is counted exactly as over a network. Several clients
meet one server as they would a service: each round the server takes every pending step in one
engine call. The server and the clients may hold one model object (the weights are only read).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fedattn.network.transport import InProcessGrid
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import StopRule
from fedattn.systems.fedsea import protocol
from fedattn.systems.fedsea.config import MAX_CLIENT_BLOCKS, SplitConfig
from fedattn.systems.fedsea.roles import Client, Server

SERVER = "server"


@dataclass(frozen=True)
class ClientQuery:
    """One client's prompt (token ids), settings and stop rule."""

    prompt: list[int]
    config: SplitConfig
    stop: StopRule = StopRule()


@dataclass
class SplitResult:
    server: Server
    clients: list[Client]
    seconds: dict[str, float]
    wall_s: float


def party_names(clients: int) -> list[str]:
    """The server is rank 0; client i is rank i (one client: 'client')."""
    return [SERVER] + (["client"] if clients == 1 else [f"client{index}" for index in range(1, clients + 1)])


def run_in_process(
    split: SplitModel, identity: str, queries: list[ClientQuery], limit: int = MAX_CLIENT_BLOCKS
) -> SplitResult:
    """Every client's answer from one server over an in-process grid, measured."""
    start = time.perf_counter()
    grid = InProcessGrid(party_names(len(queries)), timeout=0.0)
    clients = [
        Client(rank, 0, grid.endpoint(rank), split, query.config, query.prompt, query.stop, identity)
        for rank, query in enumerate(queries, start=1)
    ]
    # one client's run is the user's own: its noise seed, if given, seeds the server's replies too
    seed = queries[0].config.noise_seed if len(queries) == 1 else None
    server = Server(0, grid.endpoint(0), split, [client.rank for client in clients], identity, limit, seed)
    seconds = protocol.run([server, *clients])
    if grid.pending():
        raise RuntimeError(f"{grid.pending()} frames were sent but never received: the protocol is inconsistent")
    return SplitResult(server, clients, seconds, time.perf_counter() - start)
