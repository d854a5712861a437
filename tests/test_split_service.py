"""FedSEA through parties that stay up (the ``split`` service handler, ``fedattn serve --system
split`` / ``fedattn ask --system split``) on loopback with tiny-random: one server service and
its clients' services, in this process (each with its own node and handler, sharing one loaded
model) or, where one must die, in a process of its own (``split_peer.py``). Every answer and byte
count is checked against the same client alone with its server in one process
(``query.answer_chat``); every wait is bounded; the prompts carry a marker no log line may contain."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from test_services import serve_handler, wait_listening

from fedattn.argtypes import OneLineParser
from fedattn.cli.main import main
from fedattn.errors import FedAttnError
from fedattn.network.federation import free_loopback_addresses, init_federation
from fedattn.network.peers import PeerFailure
from fedattn.network.service import Query, ask
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.models import load_model
from fedattn.systems.fedsea.config import config_from_args
from fedattn.systems.fedsea.query import SplitSetup, answer_chat
from fedattn.systems.fedsea.service import (
    SplitHandler,
    add_ask_options,
    add_serve_options,
    ask_input,
    handler_from_args,
)

MARK = "QX7MARK"
NAMES = ["server", "alice", "bob", "carol"]
CLIENTS = {  # each client's prompt and settings: its own (A, C), codec, sampling (noise: a fresh secret seed each time)
    "alice": (f"{MARK} Alice's locker code is 4417. What is it?", ["--client-blocks", "1,2"]),
    "bob": (f"{MARK} Bob keeps the key to room 9.", ["--client-blocks", "2,2", "--hidden-codec", "bfloat16"]),
    "carol": (f"{MARK} Where is Carol?", ["--client-blocks", "3,1", "--temperature", "0.8", "--seed", "5"]),
}
COMMON = ["--max-new-tokens", "8", "--timeout", "20"]
SERVER_LIMIT = 3  # the server's --max-client-blocks
ASK_BOUND_S = 120
PEER = str(Path(__file__).with_name("split_peer.py"))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-random", progress=False)


@pytest.fixture
def federation(tmp_path):
    return init_federation(tmp_path / "federation", NAMES, free_loopback_addresses(4), NAMES[1:])


def ask_args(prompt: str, options: list[str]):
    parser = OneLineParser(prog="ask", add_help=False)
    add_ask_options(parser)
    return parser.parse_args(["--prompt", prompt, *COMMON, *options])


def reference(loaded, name: str) -> dict:
    """The client alone with its server in one process."""
    prompt, options = CLIENTS[name]
    args = ask_args(prompt, options)
    setup = SplitSetup(config_from_args(args), loaded, "cpu", "float32", args.raw)
    return answer_chat(setup, prompt).to_json()


def slowed(loaded, seconds: float):
    """The model's run, slower by ``seconds`` per call, so that steps of queries running at once
    queue while a batch runs (a tiny model's step is over before another arrives)."""
    split = SplitModel(loaded.model)

    def run(rows):
        time.sleep(seconds)
        return split.run(rows)

    return run


def serving(stack: ExitStack, federation, loaded, server_run=None, clients=tuple(CLIENTS)) -> SplitHandler:
    """The server's service (A and C up to SERVER_LIMIT) and a service for each of ``clients``; the
    server's handler."""
    server = SplitHandler(loaded, "cpu", "float32", SERVER_LIMIT, server_run)
    serve_handler(stack, federation, "server", server)
    for name in clients:
        serve_handler(stack, federation, name, SplitHandler(loaded, "cpu", "float32"))
    return server


def asking(federation, name: str, prompt: str | None = None, options: list[str] | None = None) -> dict:
    """``fedattn ask --system split --parties server`` as ``name``: its words and prompt, its result."""
    words, private = ask_input(ask_args(prompt or CLIENTS[name][0], CLIENTS[name][1] if options is None else options))
    return ask(federation, name, federation.credentials(name), ["server", name], words, private)


def at_once(federation, names: list[str]) -> dict[str, dict]:
    """Every client of ``names`` asks at the same moment; their results."""
    results: dict[str, dict] = {}
    inside = threading.Barrier(len(names), timeout=ASK_BOUND_S)

    def one(name: str) -> None:
        inside.wait()
        results[name] = asking(federation, name)

    threads = [threading.Thread(target=one, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(ASK_BOUND_S)
    assert not any(thread.is_alive() for thread in threads), "a query hung"
    return results


def assert_solo_run(served: dict, expected: dict, name: str) -> None:
    assert served["answer_token_ids"] == expected["answer_token_ids"] and served["answer_token_ids"]
    assert served["answer"] == expected["answer"]
    fields = ("rank", "role", "bytes_sent", "bytes_received", "frames_sent", "frames_received")
    assert [[party[key] for key in fields] for party in served["parties"]] == [
        [party[key] for key in fields] for party in expected["parties"]
    ]
    assert [party["name"] for party in served["parties"]] == ["server", name]
    for party in served["parties"]:
        assert (party["bytes_sent"], party["bytes_received"]) == (
            party["expected_bytes_sent"],
            party["expected_bytes_received"],
        )
    assert served["config"] == expected["config"] and served["client_blocks"] == expected["client_blocks"]


def test_clients_at_once_get_their_solo_answers_and_share_the_servers_batches(federation, loaded, caplog):
    expected = {name: reference(loaded, name) for name in CLIENTS}
    with ExitStack() as stack, caplog.at_level(logging.INFO, logger="fedattn.network"):
        server = serving(stack, federation, loaded, slowed(loaded, 0.03))
        results = at_once(federation, list(CLIENTS))
        assert server.sessions() == {}
    for name in CLIENTS:
        assert_solo_run(results[name], expected[name], name)
    trace = server.batcher.trace
    for name in CLIENTS:  # each query's steps, once each: the prompt, then one per later token
        steps = sum(label.startswith(f"{name}/") for batch in trace for label in batch.clients)
        assert steps == len(expected[name]["answer_token_ids"])
    # every client keeps another (A, C): a batch of two queries ran rows of different block ranges
    assert any(len(set(batch.clients)) > 1 for batch in trace), "no batch ran steps of different queries"
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("query ")]
    assert len(lines) == 2 * len(CLIENTS) and all(line.endswith("; answered") for line in lines)
    assert MARK not in caplog.text


def test_a_noisy_query_sends_what_its_cost_model_says(federation, loaded):
    """Noise is drawn from a secret seed per session, so its answer has no fixed reference: what it
    must keep is the protocol (every frame's size, as the cost model has it for its answer)."""
    with ExitStack() as stack:
        serving(stack, federation, loaded, clients=("bob",))
        options = [*CLIENTS["bob"][1], "--noise-relative", "0.05", "--reply-noise", "0.05"]
        served = asking(federation, "bob", options=options)
    assert served["answer_token_ids"] and served["noise"] == 0.05 and served["noise_relative"]
    assert [party["name"] for party in served["parties"]] == ["server", "bob"]
    for party in served["parties"]:
        assert (party["bytes_sent"], party["bytes_received"]) == (
            party["expected_bytes_sent"],
            party["expected_bytes_received"],
        )


def test_bad_options_are_refused_in_one_line_and_the_server_keeps_serving(federation, loaded):
    expected = reference(loaded, "alice")
    with ExitStack() as stack:
        serving(stack, federation, loaded)
        refusals = {
            # the server's own limit, in its own words
            "4,1": "server refused the query's options: --client-blocks 4,1: the server serves A and C in 1..3",
            # the asker's: nothing left for the server of tiny-random's 8 blocks
            "5,3": "--client-blocks 5,3: A + C = 8 leaves the server none of the model's 8 blocks "
            "(A + C must be below 8)",
        }
        for blocks, why in refusals.items():
            with pytest.raises(FedAttnError) as refusal:
                asking(federation, "alice", options=["--client-blocks", blocks])
            assert str(refusal.value) == why and not isinstance(refusal.value, PeerFailure)
        with pytest.raises(FedAttnError, match="^the prompt is empty$"):
            asking(federation, "alice", prompt="  ")
        with pytest.raises(FedAttnError, match="^argument --hidden-codec: unknown hidden-state codec 'nope'"):
            asking(federation, "alice", options=["--hidden-codec", "nope"])
        with pytest.raises(FedAttnError, match="^--noise-seed is for local runs: a query's options reach the server"):
            asking(federation, "alice", options=["--noise", "0.1", "--noise-seed", "3"])
        words, private = ask_input(ask_args(*CLIENTS["alice"]))
        with pytest.raises(FedAttnError) as refusal:
            ask(federation, "alice", federation.credentials("alice"), ["server", "bob", "alice"], words, private)
        assert str(refusal.value) == "a FedSEA query is a server and its client (--parties SERVER), not 3 parties"
        assert_solo_run(asking(federation, "alice"), expected, "alice")  # still serving


@pytest.mark.parametrize(
    "words, why",
    [
        (["--client-blocks", "5,3"], "--client-blocks 5,3: A + C = 8 leaves the server none of the model's 8 blocks"),
        (["--client-blocks", "6,1"], "--client-blocks 6,1: the server serves A and C in 1..5"),
        (["--client-blocks", "0,2"], "argument --client-blocks: '0,2': the client keeps at least one block at each"),
        (["--hidden-codec", "nope"], "argument --hidden-codec: unknown hidden-state codec 'nope'"),
        (["--noise", "0.1", "--noise-relative", "0.1"], "argument --noise-relative: not allowed with argument --noise"),
        (["--prompt", " "], "the prompt is empty"),
    ],
)
def test_fedattn_split_refuses_bad_options_in_one_line(capsys, words, why):
    code = main(["split", "--model", "tiny-random", "--prompt", "hi", *words])
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    assert captured.err.startswith(f"fedattn: error: {why}") and captured.err.count("\n") == 1


def test_fedattn_split_prints_the_answer_bytes_times_and_the_client_share(capsys):
    words = ["split", "--model", "tiny-random", "--prompt", "hi", "--client-blocks", "1,3", "--max-new-tokens", "4"]
    assert main([*words, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(words) == 0
    table = capsys.readouterr().out
    share = report["client_share"]
    assert f"Answer (client): {report['answer']}" in table and "predicted" in table and "per_token" in table
    assert "client: embeddings, blocks 0..0 and the last 3, the head" in table
    assert (
        f"client share: {share['compute']:.0%} of the compute per token, {share['memory']:.0%} of the weights, "
        "50% of the KV cache" in table  # 1 + 3 of tiny-random's 8 blocks
    )


def test_a_client_killed_mid_generation_frees_its_session_and_the_others_finish(federation, loaded, caplog, tmp_path):
    """carol's service, a process of its own, dies at its sixth step; alice and bob ask meanwhile."""
    timeout = 8
    expected = {name: reference(loaded, name) for name in ("alice", "bob")}
    prompt, options = CLIENTS["carol"]
    words = [*options, "--max-new-tokens", "12", "--timeout", str(timeout)]
    command = [sys.executable, PEER, str(federation.folder / "roster.toml"), "carol", "ask", "server", prompt, *words]
    env = dict(ENV, FEDATTN_INJECT_FAULT="1@step 6=kill")
    with ExitStack() as stack, caplog.at_level(logging.INFO, logger="fedattn.network"):
        server = serving(stack, federation, loaded, slowed(loaded, 0.05), clients=("alice", "bob"))
        victim = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stack.callback(victim.kill)
        deadline = time.monotonic() + ASK_BOUND_S
        while not any(server.sessions().values()):  # carol's session holds her prompt's K/V on the server
            assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()
            time.sleep(0.05)
        results = at_once(federation, ["alice", "bob"])
        assert victim.wait(ASK_BOUND_S) == -9
        freed = time.monotonic() + timeout + 10
        while server.sessions() and time.monotonic() < freed:
            time.sleep(0.1)
        assert server.sessions() == {}
        lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("query ")]
    for name in ("alice", "bob"):
        assert_solo_run(results[name], expected[name], name)
    failed = [line for line in lines if "parties server,carol;" in line]
    assert len(failed) == 1 and "failed: carol (rank 1) is gone (last seen at step 6)" in failed[0], failed
    assert MARK not in caplog.text


def test_a_dead_server_is_named_by_its_client_within_the_bound(federation, loaded):
    """The server's service, a process of its own, dies at its third round of alice's query."""
    timeout = 8
    roster = str(federation.folder / "roster.toml")
    env = dict(ENV, FEDATTN_INJECT_FAULT="0@serve 3=kill")
    with ExitStack() as stack:
        server = subprocess.Popen([sys.executable, PEER, roster, "server", "serve"], env=env, stderr=subprocess.PIPE)
        stack.callback(server.kill)
        wait_listening(federation.entry("server").address, server)
        serve_handler(stack, federation, "alice", SplitHandler(loaded, "cpu", "float32"))
        start = time.monotonic()
        with pytest.raises(PeerFailure) as failure:
            asking(federation, "alice", options=["--timeout", str(timeout)])
        named_after = time.monotonic() - start
        assert server.wait(ASK_BOUND_S) == -9
    assert "server (rank 0) is gone (last seen at serve 3)" in str(failure.value)
    assert named_after <= timeout + 10
    assert MARK not in str(failure.value)


def test_serve_options_give_the_servers_limit_and_refuse_a_document():
    parser = OneLineParser(prog="serve", add_help=False)
    add_serve_options(parser)
    assert parser.parse_args([]).max_client_blocks == 5  # FedSEA's code allows A and C in 1..5
    with pytest.raises(FedAttnError, match="^argument --max-client-blocks: must be >= 1, got 0$"):
        parser.parse_args(["--max-client-blocks", "0"])
    args = parser.parse_args(["--model", "tiny-random", "--device", "cpu", "--max-client-blocks", "2"])
    with pytest.raises(FedAttnError, match="^a FedSEA party serves its model, not a document"):
        handler_from_args(args, "a document")
    handler = handler_from_args(args, None)
    try:
        query = Query("ab" * 16, "split", ("server", "alice"), ("--client-blocks", "2,3"))
        with pytest.raises(FedAttnError, match="^--client-blocks 2,3: the server serves A and C in 1..2$"):
            handler.plan(query, 0)
        assert handler.plan(query, 1).settings[0].client_blocks == (2, 3)  # the client's own limit is the model's
    finally:
        handler.close()
