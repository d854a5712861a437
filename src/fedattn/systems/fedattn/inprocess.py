"""Running FedAttn queries with every party in this process (the embedded default).

Parties share only the model weights (read-only) and the in-process grid; each keeps its own
tokens and KV store. The parties of a query go through ``protocol.PHASES`` together, each phase
in segment order (see ``protocol`` for why that is exact without threads); the answers of several
queries (an evaluation's problems) are decoded together in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedattn.network.transport import InProcessGrid
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.runtime.batch_decode import decode_rows
from fedattn.runtime.decoding import StopRule
from fedattn.systems.fedattn import protocol
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.party import Participant, PartyOutcome, party_names


@dataclass
class RunResult:
    answer_token_ids: list[int]
    answers: dict[int, list[int]]
    parties: list[PartyOutcome]
    prefill_s: float
    decode_s: float
    answer_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        publisher = self.parties[-1]
        steps = max(publisher.generated_tokens - 1, 0)
        return steps / publisher.decode_s if publisher.decode_s > 0 else 0.0


def run_in_process(
    model: torch.nn.Module,
    segments: list[list[int]],
    config: RunConfig,
    stop: StopRule = StopRule(),
    model_identity: str = "",
) -> RunResult:
    """Answer with the publisher (the last segment's owner) and, if asked, every other party."""
    return run_many_in_process(model, [segments], config, stop, model_identity)[0]


def run_many_in_process(
    model: torch.nn.Module,
    queries: list[list[list[int]]],
    config: RunConfig,
    stop: StopRule = StopRule(),
    model_identity: str = "",
) -> list[RunResult]:
    """Several independent queries, each on its own grid, every answer of every query decoded in
    one batch. Each result's ``decode_s`` is its share of the batch's decoding time."""
    grids = [_parties(model, segments, config, stop, model_identity) for segments in queries]
    with federated_attention_enabled(model):
        seconds = protocol.run(
            [parties for parties, _ in grids], lambda rows: decode_rows(model, rows, config.max_new_tokens)
        )
    return [_result(parties, grid, stages) for (parties, grid), stages in zip(grids, seconds)]


def _parties(
    model: torch.nn.Module, segments: list[list[int]], config: RunConfig, stop: StopRule, model_identity: str
) -> tuple[list[Participant], InProcessGrid]:
    grid = InProcessGrid(party_names(len(segments)), timeout=0.0)
    parties = [
        Participant(rank, segment, model, grid.endpoint(rank), config, stop, model_identity)
        for rank, segment in enumerate(segments)
    ]
    return parties, grid


def _prefill(
    model: torch.nn.Module, segments: list[list[int]], config: RunConfig, stop: StopRule, model_identity: str
) -> tuple[list[Participant], InProcessGrid, float]:
    """One query's parties after the handshake and prefill (for callers that inspect their stores
    or decode on their own); the parties, their grid, the prefill time."""
    parties, grid = _parties(model, segments, config, stop, model_identity)
    seconds = protocol.take(parties, protocol.PREFILLED)
    return parties, grid, seconds["prefill"]


def _result(parties: list[Participant], grid: InProcessGrid, seconds: dict[str, float]) -> RunResult:
    """A check that every frame was consumed, and the result."""
    if grid.pending():
        raise RuntimeError(f"{grid.pending()} frames were sent but never received: the schedule is inconsistent")
    publisher = parties[-1]
    return RunResult(
        answer_token_ids=publisher.answer,
        answers={party.rank: party.answer for party in parties if party.answers},
        parties=[party.outcome() for party in parties],
        prefill_s=seconds["prefill"],
        decode_s=seconds["decode"],
        answer_logits=publisher.answer_logits,
    )
