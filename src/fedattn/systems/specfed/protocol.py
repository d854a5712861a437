"""The order of a SpecFed run, written once: the handshake, then rounds until the server is done.

Both runners execute it through ``run``: the networked runner with its one party, which blocks on
its transport when a step waits for a peer; the in-process runner with every party (the workers,
then the server), each phase taken by every party that takes part before the next. That is exact
without threads: each step waits only for what was sent in an earlier phase (the server's hello
before the workers answer it, to every party; the workers' hellos before anyone checks them; the
drafts before the workers verify them; every worker's records before the server decides; the
verdict before the workers apply it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedattn.systems.phases import Phase, take
from fedattn.systems.specfed.roles import Party, Server, Worker


def server(party: Party) -> bool:
    return isinstance(party, Server)


def worker(party: Party) -> bool:
    return isinstance(party, Worker)


HANDSHAKE: tuple[Phase[Party], ...] = (
    Phase("hello", "handshake", server, Server.send_hello),
    Phase("worker hellos", "handshake", worker, Worker.answer_hello),
    Phase("workers' handshake", "handshake", worker, Worker.check_hellos),
    Phase("handshake", "handshake", server, Server.receive_hellos),
)
ROUND: tuple[Phase[Party], ...] = (
    Phase("draft", "draft", server, Server.draft),
    Phase("verify", "verify", worker, Worker.verify),
    Phase("decide", "decide", server, Server.decide),
    Phase("verdict", "verify", worker, Worker.apply_verdict),
)


def run(parties: Sequence[Party], after_round: Callable[[], None] = lambda: None) -> dict[str, float]:
    """The handshake, then rounds until every party is done (the server's verdict says when);
    ``after_round`` is called after each (the in-process runner measures there); seconds per stage."""
    seconds = take(parties, HANDSHAKE)
    while not all(party.done for party in parties):
        for stage, spent in take(parties, ROUND).items():
            seconds[stage] = seconds.get(stage, 0.0) + spent
        after_round()
    return seconds


def stage_times(seconds: dict[str, float]) -> dict[str, float]:
    """A run's report timing: the handshake, and decoding (every round, waits included)."""
    return {
        "handshake_s": seconds.get("handshake", 0.0),
        "decode_s": sum(spent for stage, spent in seconds.items() if stage != "handshake"),
    }
