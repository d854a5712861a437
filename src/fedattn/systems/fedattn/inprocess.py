"""Running one FedAttn query with every party in this process (the embedded default).

Parties share only the model weights (read-only) and the in-process grid; each keeps its own
tokens and KV store. The phases of ``Participant.run`` are interleaved party by party in segment
order, which causality makes exact: during prefill a party needs only what earlier parties have
already sent, so no party ever waits and no thread is needed. Decoding needs no messages, so the
answers of several queries (an evaluation's problems) are decoded together in one batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fedattn.network.transport import InProcessGrid
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.runtime.batch_decode import decode_rows
from fedattn.runtime.decoding import StopRule
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.party import Participant


@dataclass
class PartyReport:
    rank: int
    name: str
    tokens: int
    kept_tokens: int
    bytes_sent: int
    bytes_received: int
    frames_sent: int
    frames_received: int
    kv_payload_sent: int
    prefill_s: float
    decode_s: float
    wait_s: float
    block_wait_s: dict[int, float]
    generated_tokens: int


@dataclass
class RunResult:
    answer_token_ids: list[int]
    answers: dict[int, list[int]]
    parties: list[PartyReport]
    prefill_s: float
    decode_s: float
    answer_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        publisher = self.parties[-1]
        steps = max(publisher.generated_tokens - 1, 0)
        return steps / publisher.decode_s if publisher.decode_s > 0 else 0.0


def party_names(count: int) -> list[str]:
    """'party-1' .. 'party-(N-1)' and 'publisher' for the last."""
    return [f"party-{n + 1}" for n in range(count - 1)] + ["publisher"]


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
    """Several independent queries: each prefilled on its own grid, then every answer of every
    query decoded in one batch (decoding needs no messages). Each result's ``decode_s`` is its
    share of the batch's decoding time."""
    with federated_attention_enabled(model):
        prefilled = [_prefill(model, segments, config, stop, model_identity) for segments in queries]
        deciders = [_decoding_parties(parties, config) for parties, _, _ in prefilled]
        rows = [party.decode_row(first) for decoding in deciders for party, first in decoding]
        decode_start = time.perf_counter()
        tokens = iter(decode_rows(model, rows, config.max_new_tokens))
        decode_s = time.perf_counter() - decode_start
        results = []
        for (parties, grid, prefill_s), decoding in zip(prefilled, deciders):
            answers = {}
            for party, _ in decoding:
                answers[party.rank] = next(tokens)
                party.record_decode(decode_s / len(rows), answers[party.rank])
            results.append(_finish(parties, grid, answers, prefill_s, decode_s / len(queries)))
    return results


def _prefill(
    model: torch.nn.Module, segments: list[list[int]], config: RunConfig, stop: StopRule, model_identity: str
) -> tuple[list[Participant], InProcessGrid, float]:
    """Handshake and prefill of every party, in segment order; the parties, their grid, the time."""
    grid = InProcessGrid(party_names(len(segments)), timeout=0.0)
    parties = [
        Participant(rank, segment, model, grid.endpoint(rank), config, stop, model_identity)
        for rank, segment in enumerate(segments)
    ]
    for party in parties:
        party.send_hello()
    for party in parties:
        party.receive_hellos()
    start = time.perf_counter()
    for party in parties:
        party.prefill()
    if config.all_answers:
        for party in parties[:-1]:
            party.receive_from_later_parties()
    return parties, grid, time.perf_counter() - start


def _decoding_parties(parties: list[Participant], config: RunConfig) -> list[tuple[Participant, int]]:
    """(party, first token) of every party that answers: the publisher first, then, if asked,
    the collaborators, who learn the first token from the publisher's message."""
    publisher = parties[-1]
    first = publisher.first_token()
    if not config.all_answers:
        return [(publisher, first)]
    publisher.share_first_token(first)
    return [(publisher, first)] + [(party, party.receive_first_token()) for party in parties[:-1]]


def _finish(
    parties: list[Participant], grid: InProcessGrid, answers: dict[int, list[int]], prefill_s: float, decode_s: float
) -> RunResult:
    """The completion messages, a check that every frame was consumed, and the result."""
    publisher = parties[-1]
    publisher.send_done(len(answers[publisher.rank]))
    for party in parties[:-1]:
        party.await_done()
    if grid.pending():
        raise RuntimeError(f"{grid.pending()} frames were sent but never received: the schedule is inconsistent")
    return RunResult(
        answer_token_ids=answers[publisher.rank],
        answers=dict(sorted(answers.items())),
        parties=[_report(party, answers.get(party.rank, [])) for party in parties],
        prefill_s=prefill_s,
        decode_s=decode_s,
        answer_logits=publisher.answer_logits,
    )


def _report(party: Participant, answer: list[int]) -> PartyReport:
    stats = party.transport.stats
    return PartyReport(
        rank=party.rank,
        name=party.name,
        tokens=len(party.token_ids),
        kept_tokens=len(party.kept),
        bytes_sent=stats.bytes_sent,
        bytes_received=stats.bytes_received,
        frames_sent=stats.frames_sent,
        frames_received=stats.frames_received,
        kv_payload_sent=party.kv_payload_sent,
        prefill_s=party.timings.prefill_s,
        decode_s=party.timings.decode_s,
        wait_s=party.timings.wait_s,
        block_wait_s=dict(party.timings.block_wait_s),
        generated_tokens=len(answer),
    )
