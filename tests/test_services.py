"""Parties that stay up (``fedattn serve`` / ``fedattn ask``) on loopback with tiny-random.

Services run as objects in this process (each with its own node and handler, sharing one loaded
model) or, where a service must die, as ``fedattn serve`` subprocesses. Every answer and byte
count is checked against ``fedattn run`` in one process; every wait is bounded. Each private text
carries a marker that no log line or error message may contain.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from fedattn.cli.main import main
from fedattn.errors import FedAttnError
from fedattn.network.federation import Roster, free_loopback_addresses, init_federation
from fedattn.network.grpc_node import GRPC_MESSAGE_PREFIX, QUERY_KEY, SERVICE
from fedattn.network.kv_codec import get_codec
from fedattn.network.peers import PeerFailure
from fedattn.network.service import Service, ask
from fedattn.runtime.models import load_model
from fedattn.systems.fedattn.networked import max_frame_bytes
from fedattn.systems.fedattn.service import FedAttnHandler

MARK = "QX7MARK"  # in every private text: never in a log line or an error message
CONTEXTS = {
    "party-1": f"{MARK} Alice's locker code is 4417 and she lives in Oslo.",
    "party-2": f"{MARK} Bob's locker code is 9230; Carol keeps the key.",
}
QUESTION = f"{MARK} What is Alice's locker code?"
NAMES = ["party-1", "party-2", "publisher"]
START_BOUND_S = 90  # a `fedattn serve` subprocess listens within this (busy machine)
ASK_BOUND_S = 60


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-random")


@pytest.fixture
def federation(tmp_path):
    return init_federation(tmp_path / "federation", NAMES, free_loopback_addresses(3), ["publisher"])


def serve(stack: ExitStack, roster, name: str, loaded, context: str | None, dtype: str = "float32") -> Service:
    return serve_handler(stack, roster, name, FedAttnHandler(loaded, dtype, context))


def serve_handler(stack: ExitStack, roster, name: str, handler) -> Service:
    """``name``'s service of ``handler`` (any system's), closed with ``stack``."""
    stack.callback(handler.close)  # closed after the service, in reverse order of starting
    service = Service(roster, name, roster.credentials(name), handler)
    stack.callback(service.close)
    return service


@pytest.fixture
def services(federation, loaded):
    """The three parties' services in this process."""
    with ExitStack() as stack:
        yield {name: serve(stack, federation, name, loaded, CONTEXTS.get(name)) for name in NAMES}


def cli(words: list[str], capsys) -> tuple[int, str, str]:
    code = main(words)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reference(options: list[str], capsys, question: str = QUESTION) -> dict:
    """The same query in one process (``fedattn run``)."""
    words = ["run", "--model", "tiny-random", "--question", question, *options, "--json"]
    for name in NAMES[:-1]:
        words += ["--context", CONTEXTS[name]]
    code, out, _ = cli(words, capsys)
    assert code == 0
    return json.loads(out)


def ask_words(roster_path: Path, options: list[str], question: str = QUESTION) -> list[str]:
    return ["ask", "--roster", str(roster_path), "--name", "publisher", "--question", question, *options]


def assert_same_run(served: dict, expected: dict) -> None:
    assert served["answer_token_ids"] == expected["answer_token_ids"]
    assert served["answer"] == expected["answer"]
    fields = ("name", "rank", "tokens", "bytes_sent", "bytes_received", "frames_sent", "frames_received")
    assert [[party[key] for key in fields] for party in served["parties"]] == [
        [party[key] for key in fields] for party in expected["parties"]
    ]
    # every copy that crossed a link was received once, as one gRPC message with its 5-byte prefix
    received = sum(p["bytes_received"] + GRPC_MESSAGE_PREFIX * p["frames_received"] for p in served["parties"])
    assert served["measured_bytes"]["link_sent"] == received


RUNS = {
    "every-2": ["--max-new-tokens", "6", "--sync-every", "2", "--timeout", "10"],
    "publisher-dense-int8": ["--max-new-tokens", "5", "--schedule", "publisher-dense", "--kv-codec", "int8"],
}


@pytest.mark.parametrize("run", RUNS)
def test_ask_gives_the_in_process_run(services, federation, capsys, caplog, run):
    expected = reference(RUNS[run], capsys)
    with caplog.at_level(logging.INFO, logger="fedattn.network"):
        code, out, err = cli([*ask_words(federation.folder / "roster.toml", RUNS[run]), "--json"], capsys)
        assert code == 0, err
        assert_same_run(json.loads(out), expected)
        code, table, err = cli(ask_words(federation.folder / "roster.toml", RUNS[run]), capsys)  # the table
    assert code == 0 and "publisher" in table and "predicted" in table
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("query ")]
    assert len(lines) == 2 * len(NAMES)  # one line per query at every service
    assert all(line.endswith("; answered") and "party-1,party-2,publisher" in line for line in lines)
    assert MARK not in caplog.text + err


def test_two_queries_in_flight_at_once(services, federation, capsys):
    questions = [QUESTION, f"{MARK} Where does Alice live?"]
    options = [RUNS["every-2"], RUNS["publisher-dense-int8"]]
    expected = [reference(words, capsys, question) for words, question in zip(options, questions)]
    credentials = federation.credentials("publisher")
    results: dict[int, object] = {}
    inside = threading.Barrier(2, timeout=ASK_BOUND_S)

    def asking(n: int) -> None:
        inside.wait()
        results[n] = ask(federation, "publisher", credentials, None, options[n], {"question": questions[n]})

    threads = [threading.Thread(target=asking, args=(n,), daemon=True) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(ASK_BOUND_S)
    assert not any(thread.is_alive() for thread in threads), "a query hung"
    for n in range(2):
        assert_same_run(results[n], expected[n])


# -- refused -----------------------------------------------------------------------------------


def raw(federation, caller: str, service: str, method: str, body: bytes, query: str | None = None):
    """One call by ``caller`` (its own certificate) to ``service``'s node; the refusal it got."""
    own = federation.credentials(caller)
    tls = grpc.ssl_channel_credentials(own.ca_pem, own.key_pem, own.cert_pem)
    options = [("grpc.ssl_target_name_override", service)]
    channel = grpc.secure_channel(federation.entry(service).address, tls, options=options)
    metadata = ((QUERY_KEY, query),) if query else None
    try:
        return channel.unary_unary(f"/{SERVICE}/{method}")(body, timeout=10, metadata=metadata)
    except grpc.RpcError as error:
        return error
    finally:
        channel.close()


def start_body(query: str, parties: list[str], options: list[str] | None = None) -> bytes:
    document = {"query": query, "system": "fedattn", "parties": parties, "options": options or []}
    return json.dumps(document).encode()


def refused(result, code: grpc.StatusCode, details: str) -> None:
    assert isinstance(result, grpc.RpcError), result
    assert (result.code(), result.details()) == (code, details)


def test_refused_calls_leave_the_services_serving(services, federation, capsys, caplog):
    query = "ab" * 16
    denied, missing = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND
    with caplog.at_level(logging.INFO, logger="fedattn.network"):
        refused(
            raw(federation, "party-2", "party-1", "Start", start_body(query, ["party-1", "party-2"])),
            denied,
            "party-1 refused a Start: party-2 may not start queries (may_start is false in the roster)",
        )
        refused(
            raw(federation, "publisher", "party-1", "Start", start_body(query, ["publisher", "party-1"])),
            denied,
            "party-1 refused a Start: the starter publisher must be the query's last party",
        )
        refused(
            raw(federation, "publisher", "party-1", "Start", b'{"query": 1}'),
            grpc.StatusCode.INVALID_ARGUMENT,
            "party-1 refused a Start without exactly the keys ['options', 'parties', 'query', 'system']",
        )
        refused(
            raw(federation, "publisher", "party-1", "Start", start_body(query, ["party-1", "publisher"], ["--bogus"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "party-1 refused the query's options: unrecognized arguments: --bogus",
        )
        refused(
            raw(federation, "publisher", "party-1", "Start", start_body(query, ["party-1", "publisher"], ["--model"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "party-1 refused the query's options: unrecognized arguments: --model",
        )
        go = json.dumps({"query": query}).encode()
        refused(raw(federation, "publisher", "party-1", "Go", go), missing, "party-1 refused a Go for an unknown query")
        refused(
            raw(federation, "publisher", "party-1", "Deliver", b"frame", query),
            missing,
            "party-1 refused a frame for an unknown query",
        )
        refused(
            raw(federation, "party-1", "publisher", "Ask", b'{"parties": null, "options": [], "input": {}}'),
            denied,
            "publisher refused Ask from party-1: only publisher asks its own service",
        )
        # a query of party-1 and the publisher: party-2 may not send into it, nor let it go
        int8 = start_body(query, ["party-1", "publisher"], ["--kv-codec", "int8"])
        started = raw(federation, "publisher", "party-1", "Start", int8)
        assert started == b"{}"
        refused(
            raw(federation, "party-2", "party-1", "Deliver", b"frame", query),
            denied,
            "party-1 refused party-2: not a party of this run",
        )
        refused(
            raw(federation, "party-2", "party-1", "Go", go),
            denied,
            "party-1 refused a Go from party-2: not the query's starter",
        )
        # the query's own limit, below the node's (a float32 frame): from its codec
        largest = max_frame_bytes(services["party-1"].handler.loaded.model.config, get_codec("int8"))
        refused(
            raw(federation, "publisher", "party-1", "Deliver", b"x" * (largest + 1), query),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"party-1 refused a frame of {largest + 1} bytes from publisher: the query's largest is {largest}",
        )
        assert raw(federation, "publisher", "party-1", "Cancel", go) == b"{}"
        # a query that gets no Go expires after its timeout
        lapsing = "cd" * 16
        short = start_body(lapsing, ["party-1", "publisher"], ["--timeout", "0.5"])
        assert raw(federation, "publisher", "party-1", "Start", short) == b"{}"
        time.sleep(1.5)
        lapsed = json.dumps({"query": lapsing}).encode()
        refused(
            raw(federation, "publisher", "party-1", "Go", lapsed), missing, "party-1 refused a Go for an unknown query"
        )
        host, port = federation.entry("party-1").address.rsplit(":", 1)
        for garbage in (os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n"):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(garbage)
                assert sock.recv(4096) == b""  # the service hangs up
        code, out, err = cli(ask_words(federation.folder / "roster.toml", RUNS["every-2"]), capsys)
    assert code == 0, err
    assert f"query {query}: parties party-1,publisher; sent 0 B, received 0 B; 0.00 s; cancelled" in caplog.text
    expired = f"query {lapsing}: parties party-1,publisher; sent 0 B, received 0 B; 0.00 s; expired: no Go within"
    assert expired in caplog.text


def test_a_party_whose_options_differ_is_refused_by_the_handshake(federation, loaded, capsys, caplog):
    """party-2 serves the model in bfloat16, so by default its K/V crosses as bfloat16."""
    other = load_model("tiny-random", dtype=torch.bfloat16)
    roster_path = federation.folder / "roster.toml"
    with ExitStack() as stack, caplog.at_level(logging.INFO, logger="fedattn.network"):
        serve(stack, federation, "party-1", loaded, CONTEXTS["party-1"])
        serve(stack, federation, "party-2", other, CONTEXTS["party-2"], dtype="bfloat16")
        serve(stack, federation, "publisher", loaded, None)
        for _ in range(2):  # and again: every service still serves
            start = time.monotonic()
            code, out, err = cli(ask_words(roster_path, []), capsys)  # the default timeout, 60 s, is not waited
            assert time.monotonic() - start < 10
            assert (code, out) == (2, "")
            # whoever saw it first: the publisher, or a collaborator whose refusal the publisher relays
            assert re.fullmatch(
                r"fedattn: error: handshake refused: party-\d \(rank \d\) differs from rank \d in KV codec\n", err
            )
    assert MARK not in caplog.text + err


def test_ask_without_a_running_service_is_one_line_and_exit_3(federation, capsys):
    start = time.monotonic()
    code, out, err = cli(ask_words(federation.folder / "roster.toml", []), capsys)
    assert time.monotonic() - start < 10
    address = federation.entry("publisher").address
    assert (code, out) == (3, "")
    assert err == f"fedattn: error: publisher's service at {address}: nothing listens at its address\n"


def test_a_collaborator_service_that_is_not_running_is_named(federation, loaded, capsys):
    with ExitStack() as stack:
        serve(stack, federation, "publisher", loaded, None)
        serve(stack, federation, "party-2", loaded, CONTEXTS["party-2"])
        start = time.monotonic()
        code, out, err = cli(ask_words(federation.folder / "roster.toml", []), capsys)
    assert time.monotonic() - start < 15
    address = federation.entry("party-1").address
    assert (code, err) == (3, f"fedattn: error: party-1 at {address}: nothing listens at its address\n")


def test_a_query_the_publisher_may_not_start_is_refused(tmp_path, loaded, capsys):
    """By its own service, and by a collaborator whose roster says so (rosters copied apart)."""
    roster = init_federation(tmp_path / "fed", NAMES, free_loopback_addresses(3), ["party-2"])
    roster_path = tmp_path / "fed" / "roster.toml"
    with ExitStack() as stack:
        serve(stack, roster, "publisher", loaded, None)
        code, out, err = cli(ask_words(roster_path, []), capsys)
        assert (code, err) == (
            2,
            "fedattn: error: publisher may not start queries (may_start is false in the roster)\n",
        )
        publisher_view = Roster(tuple(replace(party, may_start=True) for party in roster.parties), roster.folder)
        stack.close()
        serve(stack, roster, "party-1", loaded, CONTEXTS["party-1"])
        serve(stack, roster, "party-2", loaded, CONTEXTS["party-2"])
        handler = FedAttnHandler(loaded, "float32", None)
        stack.callback(handler.close)
        stack.callback(Service(publisher_view, "publisher", roster.credentials("publisher"), handler).close)
        code, out, err = cli(ask_words(roster_path, []), capsys)
    refusal = "party-1 refused a Start: publisher may not start queries (may_start is false in the roster)"
    assert (code, err) == (2, f"fedattn: error: {refusal}\n")


# -- a collaborator service that dies and comes back ----------------------------------------------


def serve_process(roster_path: Path, name: str, context: str, log: Path, fault: str | None = None):
    env = dict(os.environ)
    env.pop("FEDATTN_INJECT_FAULT", None)
    if fault:
        env["FEDATTN_INJECT_FAULT"] = fault
    words = ["serve", "--roster", str(roster_path), "--name", name, "--model", "tiny-random", "--context", context]
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "fedattn.cli", *words], env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )


def wait_listening(address: str, process: subprocess.Popen) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + START_BOUND_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the service exited"
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listened at {address} within {START_BOUND_S} s")


def test_a_killed_collaborator_is_named_and_its_restart_rejoins(federation, loaded, tmp_path, capsys, caplog):
    roster_path = federation.folder / "roster.toml"
    address = federation.entry("party-1").address
    timeout = 5
    options = ["--max-new-tokens", "4", "--sync-every", "2", "--timeout", str(timeout)]
    expected = reference(options, capsys)
    logs = [tmp_path / "killed.log", tmp_path / "restarted.log"]
    credentials = federation.credentials("publisher")
    with ExitStack() as stack, caplog.at_level(logging.INFO, logger="fedattn.network"):
        serve(stack, federation, "party-2", loaded, CONTEXTS["party-2"])
        serve(stack, federation, "publisher", loaded, None)
        doomed = serve_process(roster_path, "party-1", CONTEXTS["party-1"], logs[0], "0@prefill block 2=kill")
        stack.callback(doomed.kill)
        wait_listening(address, doomed)
        start = time.monotonic()
        with pytest.raises(PeerFailure) as failed:
            ask(federation, "publisher", credentials, None, options, {"question": QUESTION})
        assert time.monotonic() - start < timeout + 10
        assert "party-1 (rank 0) is gone (last seen at prefill block 2)" in str(failed.value)
        assert doomed.wait(10) == -signal.SIGKILL
        restarted = serve_process(roster_path, "party-1", CONTEXTS["party-1"], logs[1])
        stack.callback(restarted.kill)
        wait_listening(address, restarted)
        assert_same_run(ask(federation, "publisher", credentials, None, options, {"question": QUESTION}), expected)
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(20) == 0
    restarted_log = logs[1].read_text()
    assert "Traceback" not in restarted_log and restarted_log.endswith("fedattn serve party-1: stopped\n")
    assert sum(line.startswith("fedattn serve party-1: query ") for line in restarted_log.splitlines()) == 1
    outcomes = [record.getMessage().rsplit("; ", 1)[1] for record in caplog.records if "query " in record.getMessage()]
    assert outcomes.count("answered") == 2 and len(outcomes) == 4  # party-2 and the publisher, once per query
    assert MARK not in caplog.text + logs[0].read_text() + restarted_log + str(failed.value)


def default_interrupt() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_service_with_exit_130(federation, tmp_path):
    log = tmp_path / "publisher.log"
    words = [
        "serve",
        "--roster",
        str(federation.folder / "roster.toml"),
        "--name",
        "publisher",
        "--model",
        "tiny-random",
    ]
    with log.open("w") as stderr:
        # as a shell starts it: SIGINT at its default, not blocked (whatever the test process has)
        process = subprocess.Popen(
            [sys.executable, "-m", "fedattn.cli", *words], stderr=stderr, preexec_fn=default_interrupt
        )
    try:
        wait_listening(federation.entry("publisher").address, process)
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 130
    finally:
        process.kill()
    text = log.read_text()
    assert "Traceback" not in text and text.endswith("fedattn: interrupted\n")


def test_a_start_for_unknown_parties_is_refused(services, federation):
    with pytest.raises(FedAttnError, match="mallory is not in the federation's roster"):
        ask(
            federation,
            "publisher",
            federation.credentials("publisher"),
            ["mallory", "publisher"],
            [],
            {"question": "q"},
        )
