"""The order of a FedRefine query, written once: the receiver's rephrasing (private mode), hellos,
answers and requests, caches, then the answer.

Both runners execute it through ``run``: a networked party with its one role, which blocks on its
transport when a step waits for a peer; the in-process runner with the receiver and every sharer
it asks, each phase taken by every party that takes part before the next. That is exact without
threads: each step waits only for what was sent in an earlier phase (the hellos before the sharers
answer them, the answers before the receiver reads them and sends its requests, the requests before
the sharers send their caches, the caches before the receiver reads them).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedattn.systems.fedrefine.roles import Receiver, Sharer
from fedattn.systems.phases import Phase, take

Party = Receiver | Sharer


def receiver(party: Party) -> bool:
    return isinstance(party, Receiver)


def sharer(party: Party) -> bool:
    return isinstance(party, Sharer)


PHASES: tuple[Phase[Party], ...] = (
    Phase("rephrase", "rephrase", receiver, Receiver.rephrase),
    Phase("hello", "handshake", receiver, Receiver.send_hellos),
    Phase("answer", "handshake", sharer, Sharer.answer_hello),
    Phase("request", "handshake", receiver, Receiver.send_requests),
    Phase("cache", "sharers", sharer, Sharer.send_cache),
    Phase("receive", "receive", receiver, Receiver.receive_caches),
    Phase("fuse and answer", "answer", receiver, Receiver.fuse_and_answer),
)


def run(parties: Sequence[Party]) -> dict[str, float]:
    """The whole query; seconds per stage."""
    return take(parties, PHASES)
