"""A system's protocol as an ordered list of phases, written once and taken by either runner.

A phase names which parties take part and the step each takes. The networked runner gives a
protocol one party (its process's own), which blocks on its transport whenever a step waits for a
peer; the in-process runner gives it every party of a query, and each phase is taken by every
party in rank order before the next starts. That is exact without threads as long as a step only
waits for what an earlier party sent in the same phase or anyone sent in an earlier one: each
system's protocol module says why its order has that property.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from fedattn.errors import FedAttnError

if TYPE_CHECKING:
    from fedattn.network.meeting import NetworkTransport

Party = TypeVar("Party")


@dataclass(frozen=True)
class Phase(Generic[Party]):
    name: str
    stage: str  # what its time counts as (FedAttn: handshake, prefill, first token, decode, completion)
    takes_part: Callable[[Party], bool]
    step: Callable[[Party], object]


def everyone(party: object) -> bool:
    return True


def take(parties: Sequence[Party], phases: Sequence[Phase[Party]]) -> dict[str, float]:
    """Each phase in turn, taken by every party that takes part, in rank order; seconds per stage."""
    seconds: dict[str, float] = {}
    for phase in phases:
        start = time.perf_counter()
        for party in parties:
            if phase.takes_part(party):
                phase.step(party)
        seconds[phase.stage] = seconds.get(phase.stage, 0.0) + time.perf_counter() - start
    return seconds


def take_alone(
    party: Party,
    transport: NetworkTransport,
    run: Callable[[Sequence[Party]], dict[str, float]],
    done: Callable[[Party], bool],
) -> dict[str, float]:
    """One networked party's whole protocol (``run``) over its joined transport, and what it sent
    delivered; seconds per stage. A party that fails before it is ``done`` first lets what it sent
    reach the others (its refusal, say), so that they fail for the real reason."""
    try:
        seconds = run([party])
        transport.flush()
        return seconds
    except FedAttnError:
        if not done(party):
            from fedattn.network.meeting import flush_before_failing  # only networked runs load the network

            flush_before_failing(transport)
        raise
