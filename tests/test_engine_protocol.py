"""One protocol, two runners: the phases of ``protocol.PHASES``, taken in segment order in one
process, or by each party on its own, blocking on its transport (the networked runner's path,
here with one thread per party over an in-process grid instead of one process each over gloo)."""

from __future__ import annotations

import threading

import pytest
from conftest import random_segments

from fedattn.network.transport import InProcessGrid
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.runtime.decoding import Decoding
from fedattn.systems.fedattn import protocol
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import run_in_process
from fedattn.systems.fedattn.networked import run_alone
from fedattn.systems.fedattn.party import Participant, party_names
from fedattn.systems.fedattn.schedule import Schedule, all_layers, every

LENGTHS = [9, 6, 7]


def phases_taken(model, rank: int, all_answers: bool) -> list[str]:
    grid = InProcessGrid(party_names(len(LENGTHS)))
    config = RunConfig(Schedule(8, ()), all_answers=all_answers)
    party = Participant(rank, [1] * LENGTHS[rank], model, grid.endpoint(rank), config)
    return [phase.name for phase in protocol.PHASES if phase.takes_part(party)]


def test_the_phases_each_role_takes(tiny):
    """The spec's order: handshake, prefill, later parties' K/V when collaborators decode, the
    publisher's first token and its share, decoding, completion."""
    model, _ = tiny
    assert phases_taken(model, 2, False) == ["hello", "handshake", "prefill", "first token", "decode", "completion"]
    assert phases_taken(model, 0, False) == ["hello", "handshake", "prefill", "completion received"]
    assert phases_taken(model, 2, True) == [
        "hello",
        "handshake",
        "prefill",
        "first token",
        "first token shared",
        "decode",
        "completion",
    ]
    assert phases_taken(model, 0, True) == [
        "hello",
        "handshake",
        "prefill",
        "later parties' K/V",
        "first token received",
        "decode",
        "completion received",
    ]


def each_party_alone(model, segments: list[list[int]], config: RunConfig) -> tuple[list[Participant], InProcessGrid]:
    """Every party runs ``networked.run_alone`` in its own thread; frames wait in the grid's mailboxes."""
    grid = InProcessGrid(party_names(len(segments)), timeout=30.0)
    parties = [Participant(rank, ids, model, grid.endpoint(rank), config) for rank, ids in enumerate(segments)]
    errors: list[BaseException] = []

    def run(party: Participant) -> None:
        try:
            run_alone(party)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(party,)) for party in parties]
    with federated_attention_enabled(model):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a party is still waiting: the phases do not match"
    if errors:
        raise errors[0]
    return parties, grid


@pytest.mark.parametrize(
    "schedule, all_answers, decoding",
    [
        (Schedule(8, every(2, 8)), False, Decoding()),
        (Schedule(8, every(3, 8)), True, Decoding(temperature=0.9, top_k=40, seed=3)),
        (Schedule(8, (), publisher_layers=all_layers(8)), True, Decoding()),
    ],
    ids=["H=2", "H=3-every-answer-sampled", "publisher-dense-every-answer"],
)
def test_each_party_alone_gives_the_in_process_run(tiny, schedule, all_answers, decoding):
    model, _ = tiny
    config = RunConfig(schedule=schedule, decoding=decoding, max_new_tokens=8, all_answers=all_answers)
    segments = random_segments(LENGTHS, seed=4)
    reference = run_in_process(model, segments, config)
    parties, grid = each_party_alone(model, segments, config)
    assert {party.rank: party.answer for party in parties if party.answers} == reference.answers
    for party, theirs in zip(parties, reference.parties, strict=True):
        ours = party.outcome()
        counts = ("bytes_sent", "bytes_received", "frames_sent", "frames_received", "kv_payload_sent")
        assert [getattr(ours, key) for key in counts] == [getattr(theirs, key) for key in counts]
    assert grid.pending() == 0
