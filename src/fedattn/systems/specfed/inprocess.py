"""Running a SpecFed query with the server and every worker in this process (the embedded default).

The parties share nothing but the in-process grid: each worker keeps its model and cache, the
server its prompt and draft, and every number crosses as a validated frame, so traffic is counted
exactly as over a network. Being in one process also allows what a deployment cannot: comparing,
each round, the server's rebuilt aggregate with the true one the workers computed (the aggregation
and acceptance-rate bias of the spec), and the round's critical path if the workers verified at
once (draft, then the slowest worker, then the decision).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fedattn.network.transport import InProcessGrid
from fedattn.runtime.decoding import StopRule
from fedattn.systems.specfed import protocol
from fedattn.systems.specfed.config import SpecFedConfig
from fedattn.systems.specfed.drafts import Drafter
from fedattn.systems.specfed.kernel import aggregate, l1, overlap
from fedattn.systems.specfed.roles import Party, Round, Server, Worker, party_names


@dataclass(frozen=True)
class WorkerModel:
    model: torch.nn.Module
    vocab: int  # the tokenizer's real tokens
    tokenizer: bytes  # its fingerprint


@dataclass
class Measurement:
    """Per verified position: ||p_hat - p||_1 and sum_i w_i eps_i; per draft: |beta_hat - beta| with
    beta = sum_x min(p(x), q(x)), and sum_i w_i eps_i at that position (its bound)."""

    aggregation_bias: list[float] = field(default_factory=list)
    residual_mass: list[float] = field(default_factory=list)
    acceptance_bias: list[float] = field(default_factory=list)
    draft_residual_mass: list[float] = field(default_factory=list)
    parallel_s: float = 0.0  # sum over rounds of draft + slowest worker's verification + decision
    seconds_so_far: dict[str, float] = field(default_factory=dict)  # each party's, at the last round's end


@dataclass
class SpecFedResult:
    answer_token_ids: list[int]
    rounds: list[Round]
    parties: list[Party]
    seconds: dict[str, float]
    wall_s: float
    measurement: Measurement | None = None


def run_in_process(
    workers: list[WorkerModel],
    drafter: Drafter,
    prompt: list[int],
    config: SpecFedConfig,
    stop: StopRule = StopRule(),
) -> SpecFedResult:
    """The server's answer to ``prompt``: every round's frames over an in-process grid, measured."""
    start = time.perf_counter()
    grid = InProcessGrid(party_names(len(workers)), timeout=0.0)
    parties: list[Party] = [
        Worker(rank, grid.endpoint(rank), config, held.model, held.vocab, held.tokenizer)
        for rank, held in enumerate(workers)
    ]
    server = Server(
        len(workers), grid.endpoint(len(workers)), config, prompt, drafter, workers[0].vocab, workers[0].tokenizer, stop
    )
    parties.append(server)
    measurement = Measurement()
    seconds = protocol.run(parties, lambda: _measure(parties, measurement))
    if grid.pending():
        raise RuntimeError(f"{grid.pending()} frames were sent but never received: the protocol is inconsistent")
    return SpecFedResult(server.answer, server.rounds, parties, seconds, time.perf_counter() - start, measurement)


def _measure(parties: list[Party], measurement: Measurement) -> None:
    """This round's biases (the workers' true distributions against the server's rebuilt aggregate)
    and its critical path; each party's times are cumulative, so the round's are the differences."""
    *workers, server = parties
    truth = aggregate([worker.last_distributions for worker in workers], server.weights)
    for position in range(truth.shape[0]):
        residual = sum(weight * worker.last_rows[position].residual for weight, worker in zip(server.weights, workers))
        measurement.aggregation_bias.append(l1(server.p_hat[position], truth[position]))
        measurement.residual_mass.append(residual)
        if position < len(server.drafts):
            q = server.q[position]
            measurement.acceptance_bias.append(abs(overlap(server.p_hat[position], q) - overlap(truth[position], q)))
            measurement.draft_residual_mass.append(residual)
    spent = {party.name: sum(party.seconds.values()) for party in parties}
    this_round = {name: seconds - measurement.seconds_so_far.get(name, 0.0) for name, seconds in spent.items()}
    measurement.seconds_so_far = spent
    measurement.parallel_s += this_round[server.name] + max(this_round[worker.name] for worker in workers)
