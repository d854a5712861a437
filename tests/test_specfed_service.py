"""SpecFed through parties that stay up (``fedattn serve --system specfed`` / ``fedattn ask
--system specfed``) on loopback with the tiny family: workers tiny-random and tiny-random-wide, the
asker (the server) drafting with tiny-random-draft. Services run as objects in this process, each
with its own node and handler; every answer and byte count is checked against ``fedattn specfed``
in one process, and the prompt carries a marker no log line may contain."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import replace

import grpc
import pytest
from test_services import cli, raw, refused, serve_handler, wait_listening

from fedattn.network.federation import free_loopback_addresses, init_federation
from fedattn.runtime.models import load_model
from fedattn.systems.specfed import config as specfed_config
from fedattn.systems.specfed.config import SpecFedConfig, WorkerSpec
from fedattn.systems.specfed.service import SpecFedHandler
from fedattn.systems.specfed.system import SYSTEM

MARK = "QX7MARK"  # in every prompt: never in a log line
PROMPT = f"{MARK} Alice's locker code is 4417. What is Alice's locker code?"
NAMES = ["w1", "w2", "server"]
MODELS = {"w1": "tiny-random", "w2": "tiny-random-wide", "server": "tiny-random-draft"}
RUNS = {
    "sampled-packed": ["--gamma", "3", "--top-k", "8", "--temperature", "0.8", "--seed", "7", "--encoding", "packed"],
    "greedy-adaptive": ["--gamma", "2", "--top-k", "16", "--adaptive-eps", "0.1", "--reconstruct", "renormalize"],
}
COMMON = ["--max-new-tokens", "10", "--timeout", "20"]


@pytest.fixture(scope="module")
def family():
    return {name: load_model(model, progress=False) for name, model in MODELS.items()}


@pytest.fixture
def federation(tmp_path):
    return init_federation(tmp_path / "federation", NAMES, free_loopback_addresses(3), ["server"])


@pytest.fixture
def services(federation, family):
    with ExitStack() as stack:
        yield {name: serve_handler(stack, federation, name, SpecFedHandler(family[name])) for name in NAMES}


def reference(options: list[str], capsys, prompt: str = PROMPT, draft: str = "tiny-random-draft") -> dict:
    """The same query with every party in one process (``fedattn specfed``)."""
    workers = ["--worker", "tiny-random:0.6", "--worker", "tiny-random-wide:0.4", "--draft", draft]
    code, out, err = cli(["specfed", *workers, "--prompt", prompt, *options, *COMMON, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def ask_words(federation, options: list[str], prompt: str = PROMPT) -> list[str]:
    roster = str(federation.folder / "roster.toml")
    return ["ask", "--system", "specfed", "--roster", roster, "--name", "server", "--parties", "w1,w2"] + [
        "--prompt",
        prompt,
        "--weights",
        "0.6,0.4",
        *options,
        *COMMON,
    ]


def assert_same_run(served: dict, expected: dict) -> None:
    assert served["answer_token_ids"] == expected["answer_token_ids"] and served["answer_token_ids"]
    assert served["answer"] == expected["answer"]
    assert (served["rounds"], served["accepted_tokens"]) == (expected["rounds"], expected["accepted_tokens"])
    fields = ("rank", "role", "bytes_sent", "bytes_received", "frames_sent", "frames_received")
    assert [[party[key] for key in fields] for party in served["parties"]] == [
        [party[key] for key in fields] for party in expected["parties"]
    ]
    assert [party["name"] for party in served["parties"]] == NAMES
    for party in served["parties"]:  # and the cost model's bytes, which the in-process run equals too
        assert (party["bytes_sent"], party["bytes_received"]) == (
            party["expected_bytes_sent"],
            party["expected_bytes_received"],
        )
    # the workers' models as their own services name them; what every party agreed on, as in process
    assert served["model"]["name"] == expected["model"]["name"] == "tiny-random+tiny-random-wide"
    assert served["config"] == expected["config"]
    assert served["setting"] == expected["setting"]


@pytest.mark.parametrize("run", RUNS)
def test_ask_gives_the_in_process_run(services, federation, capsys, caplog, run):
    expected = reference(RUNS[run], capsys)
    with caplog.at_level(logging.INFO, logger="fedattn.network"):
        code, out, err = cli([*ask_words(federation, RUNS[run]), "--json"], capsys)
        assert code == 0, err
        assert_same_run(json.loads(out), expected)
        code, table, err = cli(ask_words(federation, RUNS[run]), capsys)  # the tables, and the rounds' line
    assert code == 0, err
    assert "server" in table and "tokens per round" in table
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("query ")]
    assert len(lines) == 2 * len(NAMES)  # one line per query at every service
    assert all(line.endswith("; answered") and "parties w1,w2,server;" in line for line in lines)
    assert MARK not in caplog.text + err


def test_prompt_lookup_drafts_as_in_process(services, federation, capsys):
    """Under --draft lookup the asker's model only tokenizes; in process the first worker's does (one tokenizer)."""
    options = ["--gamma", "3", "--top-k", "all"]
    expected = reference(options, capsys, draft="lookup")
    code, out, err = cli([*ask_words(federation, [*options, "--draft", "lookup"]), "--json"], capsys)
    assert code == 0, err
    served = json.loads(out)
    assert_same_run(served, expected)
    assert served["model"]["draft"] == expected["model"]["draft"] == {"name": "lookup", "identity": None}


def test_two_queries_in_a_row_reuse_the_loaded_models(federation, family, capsys, monkeypatch):
    """Handlers made as ``fedattn serve --system specfed`` makes them: one load per service, none per query."""
    loads: list[str] = []

    def counted(name: str, **options):
        loads.append(name)
        return family[next(party for party, model in MODELS.items() if model == name)]

    prompts = [PROMPT, f"{MARK} Bob's code is 9230. What is Bob's code?"]
    expected = [reference(RUNS[run], capsys, prompt) for run, prompt in zip(RUNS, prompts)]
    monkeypatch.setattr(specfed_config, "load_model", counted)
    with ExitStack() as stack:
        for name in NAMES:
            args = argparse.Namespace(model=MODELS[name], device="cpu", dtype="float32")
            serve_handler(stack, federation, name, SYSTEM.serve_handler(args, None))
        assert loads == list(MODELS.values())
        for run, prompt, reference_run in zip(RUNS, prompts, expected):
            code, out, err = cli([*ask_words(federation, RUNS[run], prompt), "--json"], capsys)
            assert code == 0, err
            assert_same_run(json.loads(out), reference_run)
    assert loads == list(MODELS.values())


def test_a_worker_of_another_tokenizer_is_refused_in_one_line_and_all_keep_serving(federation, family, capsys):
    """w2 serves tiny-random-renumbered (as many tokens, numbered otherwise): the handshake refuses it
    (the asker knows no worker's model, so it names the party), twice, with every service still up."""
    foreign = load_model("tiny-random-renumbered", progress=False)
    with ExitStack() as stack:
        for name in NAMES:
            loaded = foreign if name == "w2" else family[name]
            serve_handler(stack, federation, name, SpecFedHandler(loaded))
        for _ in range(2):
            code, out, err = cli(ask_words(federation, RUNS["greedy-adaptive"]), capsys)
            assert (code, out) == (2, "")
            assert err.startswith("fedattn: error: w2 has another tokenizer (259 tokens, ")
            assert err.endswith("SpecFed's workers and draft must share one\n") and err.count("\n") == 1
            assert MARK not in err


def test_bad_options_are_refused_in_one_line(services, federation, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="fedattn.network"):
        code, out, err = cli(ask_words(federation, ["--weights", "1,2,3"]), capsys)
        assert (code, out, err) == (2, "", "fedattn: error: --weights gives 3 weights for a query of 2 workers\n")
        code, out, err = cli(ask_words(federation, ["--gamma", "33"]), capsys)
        assert (code, out, err) == (2, "", "fedattn: error: --gamma 33: a service takes at most 32 drafts per round\n")
        code, out, err = cli(ask_words(federation, ["--top-k", "all", "--adaptive-eps", "0.1"]), capsys)
        assert (code, err) == (
            2,
            "fedattn: error: --adaptive-eps needs a cap: give --top-k K (the most tokens a position may send)\n",
        )
        # a worker reads the words itself: a starter's Start with words it refuses
        for words, why in (
            (["--bogus"], "unrecognized arguments: --bogus"),
            (["--weights", "1"], "--weights gives 1 weights for a query of 2 workers"),
            (["--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
        ):
            body = {"query": "ab" * 16, "system": "specfed", "parties": NAMES, "options": words}
            refused(
                raw(federation, "server", "w1", "Start", json.dumps(body).encode()),
                grpc.StatusCode.INVALID_ARGUMENT,
                f"w1 refused the query's options: {why}",
            )
        fedattn_start = {"query": "ab" * 16, "system": "fedattn", "parties": NAMES, "options": []}
        refused(
            raw(federation, "server", "w1", "Start", json.dumps(fedattn_start).encode()),
            grpc.StatusCode.FAILED_PRECONDITION,
            "w1 refused a Start for 'fedattn': w1 serves specfed",
        )
        code, out, err = cli([*ask_words(federation, RUNS["sampled-packed"]), "--json"], capsys)  # still serving
    assert code == 0, err
    assert MARK not in caplog.text


def test_ask_without_a_prompt_and_serve_with_a_document_are_refused(federation, capsys):
    roster = str(federation.folder / "roster.toml")
    code, out, err = cli(["ask", "--system", "specfed", "--roster", roster, "--name", "server"], capsys)
    assert (code, out, err) == (2, "", "fedattn: error: the following arguments are required: --prompt\n")
    words = ["serve", "--system", "specfed", "--roster", roster, "--name", "w1", "--model", "tiny-random"]
    code, out, err = cli([*words, "--context", "a document"], capsys)
    assert (code, err) == (
        2,
        "fedattn: error: a SpecFed party serves its model, not a document: --context is FedAttn's\n",
    )
    code, out, err = cli(["serve", "--system", "nope", "--roster", roster, "--name", "w1"], capsys)
    assert (code, err) == (2, "fedattn: error: unknown system 'nope'; choose one of fedattn, specfed, split, refine\n")


def test_fedattn_serve_system_specfed_serves_the_askers_queries(federation, family, tmp_path, capsys):
    """The asker's service as ``fedattn serve --system specfed`` (a process; its model is the draft)."""
    expected = reference(RUNS["greedy-adaptive"], capsys)
    roster = str(federation.folder / "roster.toml")
    words = ["serve", "--system", "specfed", "--roster", roster, "--name", "server", "--model", "tiny-random-draft"]
    log = tmp_path / "server.log"
    with ExitStack() as stack, log.open("w") as stderr:
        for name in NAMES[:-1]:
            serve_handler(stack, federation, name, SpecFedHandler(family[name]))
        process = subprocess.Popen([sys.executable, "-m", "fedattn.cli", *words], stderr=stderr)
        stack.callback(process.kill)
        wait_listening(federation.entry("server").address, process)
        code, out, err = cli([*ask_words(federation, RUNS["greedy-adaptive"]), "--json"], capsys)
        assert code == 0, err
        assert_same_run(json.loads(out), expected)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    lines = log.read_text().splitlines()
    address = federation.entry("server").address
    assert lines[0] == f"fedattn serve server: serving specfed at {address}"
    assert [line for line in lines if line.startswith("fedattn serve server: query ")] == lines[1:2]
    assert lines[1].endswith("; answered") and lines[-1] == "fedattn serve server: stopped"
    assert MARK not in log.read_text()


def test_the_handshake_fingerprint_covers_what_all_must_agree_on_not_whose_models():
    """A service's server knows no worker's model and a worker not the draft: the same settings as
    each party sees them give one fingerprint; each setting all must agree on changes it."""
    base = SpecFedConfig(
        (WorkerSpec("tiny-random", 0.6), WorkerSpec("tiny-random-wide", 0.4)),
        "tiny-random-draft",
        4,
        64,
        None,
        "redistribute",
        "f32",
        0.0,
        0,
        10,
    )
    as_seen = [
        replace(base, workers=(WorkerSpec(None, 0.6), WorkerSpec(None, 0.4))),  # the server's service
        replace(base, workers=(WorkerSpec("other", 0.6), WorkerSpec(None, 0.4)), draft=None),  # a worker's
    ]
    assert {config.fingerprint() for config in as_seen} == {base.fingerprint()}
    changed = [
        replace(base, workers=(WorkerSpec("tiny-random", 0.4), WorkerSpec("tiny-random-wide", 0.6))),
        replace(base, draft="lookup"),
        replace(base, gamma=3),
        replace(base, top_k=None),
        replace(base, adaptive_eps=0.1),
        replace(base, reconstruct="renormalize"),
        replace(base, encoding="packed"),
        replace(base, temperature=0.5),
        replace(base, seed=1),
        replace(base, max_new_tokens=11),
    ]
    assert len({config.fingerprint() for config in [base, *changed]}) == len(changed) + 1
