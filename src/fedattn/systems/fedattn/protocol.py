"""The order of a FedAttn run, written once: which party takes which step, phase by phase.

Both runners execute ``PHASES`` through ``run``. The networked runner gives it one party (its
process's own), which blocks on its transport whenever a phase waits for a peer. The in-process
runner gives it every party of a query, and each phase is taken by every party in segment order
before the next phase starts; causality makes this exact: a party only ever waits for what an
earlier party sent in the same phase (K/V during prefill) or what anyone sent in an earlier phase,
so no party ever waits for a frame that is not there yet and no thread is needed.

Decoding needs no messages, so the decode phase only collects each answering party's
``DecodeRow``; the runner decodes them its own way (in-process: every row of every query in one
batch; networked: its one row, noting progress so a long answer does not look like a stall).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from fedattn.runtime.batch_decode import DecodeRow
from fedattn.systems.fedattn.party import Participant
from fedattn.systems.phases import Phase, everyone, take


def publisher(party: Participant) -> bool:
    return party.is_publisher


def collaborator(party: Participant) -> bool:
    return not party.is_publisher


def answers(party: Participant) -> bool:
    return party.answers


def answering_collaborator(party: Participant) -> bool:
    """Only a collaborator that decodes needs what later parties sent, and the first token."""
    return party.answers and not party.is_publisher


def sharing_publisher(party: Participant) -> bool:
    return party.is_publisher and party.config.all_answers


DECODE = Phase("decode", "decode", answers, Participant.decode_row)

PHASES: tuple[Phase, ...] = (
    Phase("hello", "handshake", everyone, Participant.send_hello),
    Phase("handshake", "handshake", everyone, Participant.receive_hellos),
    Phase("prefill", "prefill", everyone, Participant.prefill),
    Phase("later parties' K/V", "prefill", answering_collaborator, Participant.receive_from_later_parties),
    Phase("first token", "first token", publisher, Participant.first_token),
    Phase("first token shared", "first token", sharing_publisher, Participant.share_first_token),
    Phase("first token received", "first token", answering_collaborator, Participant.receive_first_token),
    DECODE,
    Phase("completion", "completion", publisher, Participant.send_done),
    Phase("completion received", "completion", collaborator, Participant.await_done),
)

_DECODE_AT = PHASES.index(DECODE)
BEFORE_DECODING, AFTER_DECODING = PHASES[:_DECODE_AT], PHASES[_DECODE_AT + 1 :]
PREFILLED = tuple(phase for phase in BEFORE_DECODING if phase.stage in ("handshake", "prefill"))

Decoder = Callable[[list[DecodeRow]], list[list[int]]]


def run(queries: Sequence[Sequence[Participant]], decode: Decoder) -> list[dict[str, float]]:
    """Every query's parties through ``PHASES``, their answers decoded by one call of ``decode``
    (each answering party is charged an equal share of its time, each query likewise); seconds per
    stage of each query."""
    seconds = [take(parties, BEFORE_DECODING) for parties in queries]
    # the publisher's row first, then the collaborators': the batch layout the runner always had,
    # so batched answers stay bit for bit those of earlier runs
    answering = [
        party for parties in queries for party in sorted(parties, key=collaborator) if DECODE.takes_part(party)
    ]
    start = time.perf_counter()
    decoded = decode([DECODE.step(party) for party in answering])
    decode_s = time.perf_counter() - start
    for party, tokens in zip(answering, decoded, strict=True):
        party.record_answer(tokens, decode_s / len(answering))
    for parties, stages in zip(queries, seconds):
        stages["decode"] = decode_s / len(queries)
        stages.update(take(parties, AFTER_DECODING))
    return seconds
