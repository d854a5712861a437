"""SpecFed with one process per party (each worker, the server) on loopback, over gloo and over
gRPC with mutual TLS: the same tokens and bytes as in one process, and a worker killed in the
middle of generation named by the others within the timeout plus the launcher's grace."""

import json
import os
import re
import subprocess
import sys

import pytest

from fedattn.cli.main import main

ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
HANG_S = 300
RUN = [
    "specfed",
    "--worker",
    "tiny-random:3",
    "--worker",
    "tiny-random-wide:2",
    "--draft",
    "tiny-random-draft",
    "--prompt",
    "Alice's locker code is 4417. What is Alice's locker code?",
    "--max-new-tokens",
    "12",
]
SAMPLED = ["--gamma", "3", "--top-k", "8", "--temperature", "0.8", "--seed", "7", "--encoding", "packed"]


def networked(argv: list[str], transport: str, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fedattn.cli", *argv, "--transport", transport]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_S, env=env or ENV)


@pytest.mark.parametrize("transport", ["torch", "grpc"])
def test_same_tokens_and_bytes_as_in_process(capsys, transport):
    assert main([*RUN, *SAMPLED, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    finished = networked([*RUN, *SAMPLED, "--json"], transport)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert report["answer_token_ids"] == expected["answer_token_ids"]
    assert report["rounds"] == expected["rounds"]
    for ours, theirs in zip(report["parties"], expected["parties"], strict=True):
        assert (ours["name"], ours["bytes_sent"], ours["bytes_received"]) == (
            theirs["name"],
            theirs["bytes_sent"],
            theirs["bytes_received"],
        )
        assert ours["bytes_sent"] == ours["expected_bytes_sent"]
        assert ours["bytes_received"] == ours["expected_bytes_received"]


@pytest.mark.parametrize(
    "transport", ["grpc"]
)  # the transports share the liveness code (peers), gloo's is tested by FedAttn
def test_a_worker_killed_mid_generation_is_named_within_the_bound(transport):
    timeout = 8
    env = dict(ENV, FEDATTN_INJECT_FAULT="1@round 3=kill")
    finished = networked([*RUN, "--gamma", "2", "--timeout", str(timeout)], transport, env=env)
    assert finished.returncode == 3, finished.stderr
    assert "worker2 (rank 1): killed by SIGKILL" in finished.stderr
    for name, rank in (("worker1", 0), ("server", 2)):
        line = next(line for line in finished.stderr.splitlines() if line.strip().startswith(f"{name} (rank {rank})"))
        assert "exit code 3" in line and "worker2 (rank 1) is gone (last seen at round 3)" in line, line
        after = float(re.search(r"([\d.]+) s after the first failure", line).group(1))
        assert after <= timeout + 10
    assert "Traceback" not in finished.stderr


def test_a_worker_of_another_tokenizer_is_refused_in_one_line(capsys):
    """tiny-random-renumbered's tokenizer has as many tokens as the others' but numbers them
    otherwise: refused in one line by every party, in one process and over the launcher alike."""
    words = ["specfed", "--worker", "tiny-random", "--worker", "tiny-random-renumbered", "--draft", "tiny-random-draft"]
    words += ["--prompt", "hi", "--max-new-tokens", "4"]
    refusal = "fedattn: error: worker2 (tiny-random-renumbered) has another tokenizer (259 tokens"
    assert main(words) == 2
    in_process = capsys.readouterr().err.strip()
    finished = networked(words, "torch")
    assert finished.returncode == 2, finished.stderr
    for message in (in_process, finished.stderr.strip()):
        assert message.startswith(refusal) and "SpecFed's workers and draft must share one" in message
        assert len(message.splitlines()) == 1
