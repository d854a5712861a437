"""FedRefine with one process per party on loopback over gloo and over gRPC with mutual TLS
(``fedattn refine --transport torch|grpc``), and through parties that stay up (``fedattn serve
--system refine`` handlers in this process, asked as ``fedattn ask --system refine``): the same
tokens and bytes as with every party in one process; a sharer service answers two receivers, each
with its own sharers; bad command lines end in one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import ExitStack

import pytest
import torch
from refine_cases import QUESTION, RECEIVER, SHARERS, projectors_for
from test_services import serve_handler

from fedattn.argtypes import OneLineParser
from fedattn.cli.main import main
from fedattn.errors import FedAttnError
from fedattn.network.federation import free_loopback_addresses, init_federation
from fedattn.network.service import SERVICE_TRANSPORT, ask
from fedattn.runtime.models import load_model
from fedattn.systems.fedrefine.service import RefineHandler, add_ask_options, ask_input

ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
HANG_S = 300
ASK_BOUND_S = 120
PARTY_FIELDS = ("rank", "role", "bytes_sent", "bytes_received", "frames_sent", "frames_received")


@pytest.fixture(scope="module")
def projector_dirs(tmp_path_factory):
    """Open-gated projectors of the receiver with each sharer (and with the other-tokenizer one)."""
    folder = tmp_path_factory.mktemp("projectors")
    receiver = load_model(RECEIVER, progress=False)
    dirs = {}
    for seed, name in enumerate((*SHARERS, "tiny-random-renumbered")):
        dirs[name] = folder / name
        projectors_for(receiver, load_model(name, progress=False), True, seed).save(dirs[name])
    return dirs


def in_process(words: list[str], capsys) -> dict:
    assert main([*words, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same_run(report: dict, expected: dict) -> None:
    assert report["answer_token_ids"] == expected["answer_token_ids"] and report["answer"] == expected["answer"]
    assert [[party[key] for key in PARTY_FIELDS] for party in report["parties"]] == [
        [party[key] for key in PARTY_FIELDS] for party in expected["parties"]
    ]
    for party in report["parties"]:
        assert (party["bytes_sent"], party["bytes_received"]) == (
            party["expected_bytes_sent"],
            party["expected_bytes_received"],
        )
    assert report["expected_bytes"] == expected["expected_bytes"] and report["config"] == expected["config"]
    fields = ("model", "bytes_to_sharer", "bytes_from_sharer", "tokens", "blocks", "same_tokenizer")
    assert [[entry[key] for key in fields] for entry in report["sharers"]] == [
        [entry[key] for key in fields] for entry in expected["sharers"]
    ]


CASES = {  # gloo: a sharer of another tokenizer, 8-bit caches; gRPC: the private mode in bfloat16
    "torch": lambda dirs: [
        *("--sharer", f"tiny-random-renumbered:{dirs['tiny-random-renumbered']}"),
        *("--kv-codec", "int8"),
    ],
    "grpc": lambda dirs: [
        *("--sharer", f"tiny-random-draft:{dirs['tiny-random-draft']}"),
        *("--kv-codec", "bfloat16", "--rephrase"),
    ],
}


@pytest.mark.parametrize("transport", ["torch", "grpc"])
def test_one_process_per_party_gives_the_in_process_run(capsys, projector_dirs, transport):
    words = ["refine", "--receiver", RECEIVER, "--prompt", QUESTION, "--max-new-tokens", "5"]
    words += CASES[transport](projector_dirs)
    expected = in_process(words, capsys)
    command = [sys.executable, "-m", "fedattn.cli", *words, "--json", "--transport", transport]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=HANG_S, env=ENV)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert_same_run(report, expected)
    assert report["rephrasing"] == expected["rephrasing"]
    assert report["measured_bytes"]["link_sent"] >= report["measured_bytes"]["sent"]


NAMES = ["wide", "draft", "alice", "bob"]


def ask_parser() -> OneLineParser:
    parser = OneLineParser(prog="ask", add_help=False)
    add_ask_options(parser)
    return parser


def asking(federation, name: str, sharers: list[tuple[str, str]], dirs, extra=()) -> dict:
    """``fedattn ask --system refine --parties P1,.. --sharer M1:DIR ..`` as ``name``."""
    words = ["--prompt", QUESTION, "--max-new-tokens", "4", "--timeout", "20", *extra]
    for _, model in sharers:
        words += ["--sharer", f"{model}:{dirs[model]}"]
    options, private = ask_input(ask_parser().parse_args(words))
    parties = [party for party, _ in sharers] + [name]
    return ask(federation, name, federation.credentials(name), parties, options, private)


def test_a_sharer_service_answers_two_receivers_as_in_process(tmp_path, projector_dirs, capsys):
    federation = init_federation(tmp_path / "federation", NAMES, free_loopback_addresses(4), ["alice", "bob"])
    with ExitStack() as stack:
        for name, model in zip(NAMES, [*SHARERS, RECEIVER, RECEIVER]):
            serve_handler(stack, federation, name, RefineHandler(load_model(model, progress=False), "cpu"))
        queries = {  # alice asks both sharers, bob the wide one alone (partial participation), at once
            "alice": [("wide", SHARERS[0]), ("draft", SHARERS[1])],
            "bob": [("wide", SHARERS[0])],
        }
        results: dict[str, dict] = {}

        def one(name: str) -> None:
            results[name] = asking(federation, name, queries[name], projector_dirs)

        threads = [threading.Thread(target=one, args=(name,)) for name in queries]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(ASK_BOUND_S)
        assert not any(thread.is_alive() for thread in threads), "a query hung"
        for name, sharers in queries.items():
            words = ["refine", "--receiver", RECEIVER, "--prompt", QUESTION, "--max-new-tokens", "4"]
            for _, model in sharers:
                words += ["--sharer", f"{model}:{projector_dirs[model]}"]
            expected = in_process(words, capsys)
            assert_same_run(results[name], expected)
            assert [party["name"] for party in results[name]["parties"]] == [p for p, _ in sharers] + [name]
            assert results[name]["transport"] == SERVICE_TRANSPORT
        # a sharer asked for a model it does not run refuses the query's start, in one line
        with pytest.raises(FedAttnError, match="draft is asked for tiny-random-wide; it runs tiny-random-draft"):
            asking(federation, "alice", [("draft", SHARERS[0])], projector_dirs)
        # as many --sharer as sharer parties
        options, private = ask_input(ask_parser().parse_args(["--prompt", QUESTION, "--sharer", SHARERS[0]]))
        with pytest.raises(FedAttnError, match="one --sharer per sharer party: 1 for 2"):
            ask(federation, "bob", federation.credentials("bob"), ["wide", "draft", "bob"], options, private)


BAD_LINES = {
    "no receiver": (["--sharer", "tiny-random-wide", "--prompt", "q"], "required: --receiver"),
    "no sharer, networked": (["--receiver", RECEIVER, "--prompt", "q", "--transport", "grpc"], "at least one --sharer"),
    "no prompt": (["--receiver", RECEIVER, "--sharer", "tiny-random-wide:/x"], "required: --prompt"),
    "empty prompt": (["--receiver", RECEIVER, "--sharer", "tiny-random-wide:/x", "--prompt", " "], "prompt is empty"),
    "no projector": (
        ["--receiver", RECEIVER, "--sharer", "tiny-random-wide", "--prompt", "q"],
        "fedattn refine train --receiver tiny-random --sharer tiny-random-wide",
    ),
    "missing projector": (
        ["--receiver", RECEIVER, "--sharer", "tiny-random-wide:/nonexistent", "--prompt", "q"],
        "holds no projector",
    ),
    "bad sharer word": (["--receiver", RECEIVER, "--sharer", "tiny-random-wide:", "--prompt", "q"], "NAME:PROJECTOR"),
    "bad codec": (["--receiver", RECEIVER, "--sharer", "x", "--kv-codec", "int3", "--prompt", "q"], "unknown KV codec"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_command_lines_end_in_one_line(capsys, case):
    words, reason = BAD_LINES[case]
    assert main(["refine", *words]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedattn: error: ") and reason in err and err.count("\n") == 1


def test_a_projector_for_other_models_is_refused_in_one_line(capsys, projector_dirs):
    # the draft sharer's projectors, named as the wide sharer's
    words = ["refine", "--receiver", RECEIVER, "--sharer", f"tiny-random-wide:{projector_dirs['tiny-random-draft']}"]
    assert main([*words, "--prompt", "q"]) == 2
    err = capsys.readouterr().err
    assert "trained for receiver tiny-random and sharer tiny-random-draft, not" in err and err.count("\n") == 1


def test_no_sharer_is_the_receiver_alone(capsys):
    """`fedattn refine` without a sharer answers as the receiver's model alone: HF generate's
    greedy tokens on the same chat prompt, and nothing sent."""
    report = in_process(["refine", "--receiver", RECEIVER, "--prompt", QUESTION, "--max-new-tokens", "8"], capsys)
    loaded = load_model(RECEIVER)
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = loaded.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
    assert report["answer_token_ids"] == expected.tolist()[: len(report["answer_token_ids"])]
    assert report["expected_bytes"] == {"sent": 0, "received": 0} and report["sharers"] == []
