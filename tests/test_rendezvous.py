"""The gloo path's rendezvous and teardown as a careless or hostile user meets them: every wait has
a deadline, and every rank exits with one named line (exit 2 for a setup mistake, 3 for a peer
that failed), never a traceback or a wait of days.

Real ``fedattn participant`` processes on loopback; each test bounds them with ``wait_all`` (a
hang fails the test) and kills whatever is left.
"""

from __future__ import annotations

import datetime
import json
import socket
import struct
import subprocess
import threading
import time

import pytest
import torch.distributed as dist
from test_networked_wire import ENV, HARD_TIMEOUT_S, SHARED, killed_at_exit, one_error_line, wait_all
from test_networked_wire import participant as wire_participant

from fedattn.cli.main import main
from fedattn.errors import EXIT_PEER_FAILURE, EXIT_USAGE

QUESTION = "What is Alice's locker code?"
CONTEXTS = ["Alice's locker code is 4417.", "Bob's locker code is 9230."]
STORE_CALL = datetime.timedelta(seconds=5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def participant(
    rank: int, world_size: int, port: int, *extra: str, timeout: float = 30, max_new_tokens: int = 4, env=ENV
) -> subprocess.Popen:
    """One party; the last rank of ``world_size`` asks, the others bring a context."""
    own = ["--question", QUESTION] if rank == world_size - 1 else ["--context", CONTEXTS[rank % len(CONTEXTS)]]
    options = ("--timeout", str(timeout), "--max-new-tokens", str(max_new_tokens), *extra)
    return wire_participant(rank, port, own, world_size=world_size, extra=options, env=env)


def finish(*processes: subprocess.Popen) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each, within the hang bound."""
    wait_all(list(processes))
    return [(process.returncode, *process.communicate()) for process in processes]


@pytest.fixture
def test_store():
    """A store served by the test (as a launcher or a first run would hold it)."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    yield store
    del store


def test_parties_that_disagree_on_the_world_size_both_stop_at_once():
    port = free_port()
    host = participant(0, 2, port)  # serves the store
    other = participant(1, 3, port)
    with killed_at_exit(host, other):
        results = finish(host, other)
    lines = {one_error_line(err) for _, _, err in results}
    assert len(lines) == 1, lines  # the same cause for both
    (line,) = lines
    assert [code for code, _, _ in results] == [EXIT_USAGE, EXIT_USAGE], line
    # whichever claimed the run first, the other is refused naming both sizes (never a join timeout)
    assert f"but the run at 127.0.0.1:{port} has --world-size" in line, line
    assert "every party must give the same" in line
    assert "--world-size 2" in line and "--world-size 3" in line


def test_a_rank_taken_twice_is_refused_and_the_run_goes_on_without_it(test_store):
    first, second = (participant(0, 2, test_store.port, "--external-store") for _ in range(2))
    publisher = participant(1, 2, test_store.port, "--external-store")
    with killed_at_exit(first, second, publisher):
        results = finish(first, second, publisher)
    twice = f"rank 0 joined the rendezvous at 127.0.0.1:{test_store.port} twice"
    refused = [code for code, _, err in results[:2] if code == EXIT_USAGE and twice in one_error_line(err)]
    assert len(refused) == 1, results
    others = [result for result in results if twice not in result[2]]  # the run goes on with the first
    assert [code for code, _, _ in others] == [0, 0], results


def test_a_second_run_on_a_port_in_use_is_refused_at_once(test_store):
    second_host = participant(0, 2, test_store.port)  # rank 0 would serve the store: the port is taken
    with killed_at_exit(second_host):
        ((code, out, err),) = finish(second_host)
    line = one_error_line(err)
    assert code == EXIT_USAGE, err
    assert f"cannot serve the rendezvous store on port {test_store.port}: the port is in use" in line
    assert out == ""


def test_a_port_held_by_a_program_that_never_answers_is_named():
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: [held.append(listener.accept()) for _ in range(8)], daemon=True).start()
    port = listener.getsockname()[1]
    party = participant(1, 2, port, "--external-store", timeout=4)
    try:
        with killed_at_exit(party):
            ((code, _, err),) = finish(party)
    finally:
        for connection, _ in held:
            connection.close()
        listener.close()
    assert code == EXIT_USAGE, err
    line = one_error_line(err)
    assert f"127.0.0.1:{port} accepted a connection but did not answer as a rendezvous store within 4 s" in line


def test_a_rank_that_never_starts_is_named_by_every_rank():
    port = free_port()
    host = participant(0, 3, port, timeout=5)
    publisher = participant(2, 3, port, timeout=5)  # rank 1 never starts
    with killed_at_exit(host, publisher):
        results = finish(host, publisher)
    for code, out, err in results:
        assert code == EXIT_PEER_FAILURE, err
        assert one_error_line(err) == "fedattn: error: party-2 (rank 1) did not join the rendezvous within 5 s"
        assert out == ""


def in_process_answer(capsys, max_new_tokens: int) -> list[int]:
    argv = ["run", *SHARED, "--max-new-tokens", str(max_new_tokens), "--question", QUESTION]  # the parties' options
    for context in CONTEXTS:
        argv += ["--context", context]
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["answer_token_ids"]


def test_a_huge_length_word_on_the_store_port_neither_blocks_the_run_nor_is_blamed(capsys, test_store):
    """torch's store reads a length word, then that many bytes: a connection that announces a
    terabyte and sends nothing must not hold up the parties' store calls."""
    hostile = socket.create_connection(("127.0.0.1", test_store.port))
    set_query, key = 1, b"fedattn/joined/0"
    hostile.sendall(bytes([set_query]) + struct.pack("<Q", len(key)) + key + struct.pack("<Q", 1 << 40))
    parties = [participant(rank, 3, test_store.port, "--external-store", timeout=8) for rank in range(3)]
    try:
        with killed_at_exit(*parties):
            results = finish(*parties)
    finally:
        hostile.close()
    for code, _, err in results:
        assert code == 0, err
    assert json.loads(results[-1][1])["answer_token_ids"] == in_process_answer(capsys, 4)


def test_the_publisher_keeps_its_answer_when_the_store_host_dies_while_it_decodes(capsys):
    """Decoding needs no messages: once the publisher decodes, losing rank 0 (which serves the
    store) cannot change the answer, so the answer is printed, with a warning naming what was lost."""
    max_new_tokens = 300  # tiny-random's answer here runs to the limit: seconds of decoding to kill rank 0 in
    port = free_port()
    parties = [participant(rank, 3, port, timeout=8, max_new_tokens=max_new_tokens) for rank in range(3)]
    with killed_at_exit(*parties):
        publisher_phase(port, parties[0], b"decoding token")
        parties[0].kill()
        results = finish(*parties)
    (code, out, err) = results[2]
    assert code == 0, err
    assert json.loads(out)["answer_token_ids"] == in_process_answer(capsys, max_new_tokens)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedattn: warning: "), err
    assert lines[0].endswith("the answer was complete before, so it stands")
    code, _, err = results[1]
    assert code == EXIT_PEER_FAILURE, err
    one_error_line(err)


def publisher_phase(port: int, host: subprocess.Popen, phase: bytes) -> None:
    """Wait (bounded) until the publisher's heartbeat ("seq progress phase", rank 2 of 3) reaches ``phase``,
    watching the store that ``host`` serves."""
    deadline = time.monotonic() + HARD_TIMEOUT_S
    watcher = None
    while True:
        assert time.monotonic() < deadline, f"the publisher never reached {phase!r}"
        assert host.poll() is None, host.communicate()
        try:
            if watcher is None:
                socket.create_connection(("127.0.0.1", port)).close()  # served? torch's client backs off for seconds
                watcher = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=STORE_CALL)
            if watcher.check(["fedattn/beat/2"]) and phase in watcher.get("fedattn/beat/2"):
                return
        except (OSError, RuntimeError):  # not served yet
            pass
        time.sleep(0.01)


class GoneParty:
    """Heartbeats as a ``Liveness`` sees them when rank 1 died at prefill block 3 and the rest live."""

    def refresh(self) -> None:
        pass

    def silent_for(self, rank: int) -> float:
        return 60.0 if rank == 1 else 0.0

    def phase_of(self, rank: int) -> str:
        return "prefill block 3"


def test_a_send_on_a_link_already_down_names_the_party_that_is_gone(monkeypatch):
    """gloo fails ``isend`` at once once it has seen a peer's socket close; that error must become
    the named PeerFailure, not a raw gloo traceback (exit 1)."""
    from fedattn.network import torch_transport
    from fedattn.network.peers import PeerFailure

    def closed_link(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    monkeypatch.setattr(torch_transport, "STALE_AFTER_S", 0.0)
    monkeypatch.setattr(torch_transport.dist, "isend", closed_link)
    monkeypatch.setattr(torch_transport.dist, "recv", lambda *args, **kwargs: threading.Event().wait())
    transport = torch_transport.TorchTransport(0, ["party-1", "party-2", "publisher"], GoneParty(), 8, 1 << 20)
    with pytest.raises(PeerFailure) as failure:
        transport.send(b"a frame", [1, 2])
    assert str(failure.value) == (
        "party-2 (rank 1) is gone (last seen at prefill block 3); party-1 was waiting for a frame to reach party-2"
    )
