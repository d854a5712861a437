"""The order of a FedSEA run, written once: hellos, then rounds until every session is done.

Both runners execute it through ``run``: a networked party with its one role, which blocks on its
transport when a step waits for a peer; the in-process runner with the server and every client,
each phase taken by every party that takes part before the next. That is exact without threads:
each step waits only for what was sent in an earlier phase (the hellos before the server answers
them, its answers before the clients read them; every client's step before the server serves the
round, the replies before the clients read them).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedattn.systems.fedsea.roles import Client, Server
from fedattn.systems.phases import Phase, take

Party = Client | Server


def client(party: Party) -> bool:
    return isinstance(party, Client)


def server(party: Party) -> bool:
    return isinstance(party, Server)


HANDSHAKE: tuple[Phase[Party], ...] = (
    Phase("hello", "handshake", client, Client.send_hello),
    Phase("answers", "handshake", server, Server.receive_hellos),
    Phase("accepted", "handshake", client, Client.receive_answer),
)
ROUND: tuple[Phase[Party], ...] = (
    Phase("step", "steps", client, Client.send_step),
    Phase("serve", "steps", server, Server.serve),
    Phase("reply", "steps", client, Client.receive_step),
)


def run(parties: Sequence[Party]) -> dict[str, float]:
    """The hellos, then rounds until every party is done; seconds per stage."""
    seconds = take(parties, HANDSHAKE)
    while not all(party.done for party in parties):
        for stage, spent in take(parties, ROUND).items():
            seconds[stage] = seconds.get(stage, 0.0) + spent
    return seconds
