"""FedSEA with one process per party (the server, the client) on loopback, over gloo and over gRPC
with mutual TLS (``fedattn split --transport torch|grpc``): the same tokens and bytes as with both
parties in one process."""

import json
import os
import subprocess
import sys

import pytest

from fedattn.cli.main import main

ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
HANG_S = 300
RUN = ["split", "--model", "tiny-random", "--prompt", "Alice's locker code is 4417. What is it?"]
SETTINGS = {  # greedy and lossless; sampled with noise both ways and a 16-bit codec
    "torch": ["--client-blocks", "1,3", "--max-new-tokens", "10"],
    "grpc": [
        "--client-blocks",
        "3,2",
        "--noise-relative",
        "0.1",
        "--reply-noise",
        "0.05",
        "--hidden-codec",
        "bfloat16",
        "--temperature",
        "0.8",
        "--seed",
        "7",
        "--noise-seed",
        "3",
        "--max-new-tokens",
        "10",
    ],
}


def networked(argv: list[str], transport: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fedattn.cli", *argv, "--transport", transport]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_S, env=ENV)


@pytest.mark.parametrize("transport", ["torch", "grpc"])
def test_same_tokens_and_bytes_as_in_process(capsys, transport):
    words = [*RUN, *SETTINGS[transport], "--json"]
    assert main(words) == 0
    expected = json.loads(capsys.readouterr().out)
    finished = networked(words, transport)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert report["answer_token_ids"] == expected["answer_token_ids"] and report["answer"] == expected["answer"]
    fields = ("name", "rank", "role", "bytes_sent", "bytes_received", "frames_sent", "frames_received")
    assert [[party[key] for key in fields] for party in report["parties"]] == [
        [party[key] for key in fields] for party in expected["parties"]
    ]
    for party in report["parties"]:
        assert (party["bytes_sent"], party["bytes_received"]) == (
            party["expected_bytes_sent"],
            party["expected_bytes_received"],
        )
    assert report["expected_bytes"] == expected["expected_bytes"]
    assert report["config"] == expected["config"] and report["client_share"] == expected["client_share"]
    assert report["baselines"] == expected["baselines"]
