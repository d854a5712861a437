"""The networked transport (one process per party over gloo on loopback) against the in-process
engine, and its behaviour when a party dies or stalls."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fedattn.cli.main import main

CONTEXTS = ["Alice's locker code is 4417 and she lives in Oslo.", "Bob's locker code is 9230.", "Carol keeps the key."]
QUESTION = "What is Alice's locker code?"
ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")


def words(parties: int, options: list[str]) -> list[str]:
    argv = ["run", "--model", "tiny-random", "--max-new-tokens", "6", *options, "--question", QUESTION]
    for context in CONTEXTS[: parties - 1]:
        argv += ["--context", context]
    return argv


def in_process(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def networked(argv: list[str], timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fedattn.cli", *argv, "--transport", "torch"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or ENV)


def leftover_parties() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "fedattn.cli" in cmdline and "participant" in cmdline:
            found.append(process)
    return found


@pytest.mark.parametrize(
    "parties,options",
    [
        (2, ["--sync-every", "1"]),
        (3, ["--sync-every", "2", "--all-answers"]),
        (4, ["--placement", "deep-half", "--sync-every", "3"]),
        (4, ["--schedule", "publisher-dense", "--sync-layers", "0,4", "--publisher-sync-every", "3", "--all-answers"]),
        (
            3,
            [
                "--ratio-comp",
                "0.7",
                "--ratio-comm",
                "0.5",
                "--ratio-comm-publisher",
                "1",
                "--seed",
                "3",
                "--all-answers",
                "--kv-codec",
                "bfloat16",
            ],
        ),
        (
            3,
            [
                "--sync-every",
                "2",
                "--all-answers",
                "--kv-codec",
                "int4-kivi",
                "--kv-select",
                "attention",
                "--kv-budget",
                "30000",
                "--kv-noise",
                "0.1",
            ],
        ),
        (3, ["--temperature", "0.8", "--top-k", "20", "--seed", "5"]),
    ],
)
def test_same_answer_and_bytes_as_in_process(capsys, parties, options):
    argv = words(parties, options)
    reference = in_process(capsys, argv)
    finished = networked([*argv, "--json"])
    assert finished.returncode == 0, finished.stderr
    merged = json.loads(finished.stdout)
    assert merged["answer_token_ids"] == reference["answer_token_ids"]
    for ours, theirs in zip(merged["participants"], reference["participants"]):
        assert ours["tokens"] == theirs["tokens"]
        assert ours["bytes_sent"] == theirs["bytes_sent"] == ours["expected_bytes_sent"]
        assert ours["bytes_received"] == theirs["bytes_received"] == ours["expected_bytes_received"]
        if "answer" in theirs:
            assert ours["answer"] == theirs["answer"]
    # point-to-point links carry one copy per addressee plus an 8-byte size word per frame
    assert merged["measured_bytes"]["link_sent"] >= merged["measured_bytes"]["sent"]
    if "--all-answers" not in options:
        assert merged["measured_bytes"]["sent"] < merged["all_gather_bytes_sent"]


def test_a_party_killed_mid_prefill_stops_everyone_within_the_bound():
    timeout = 8
    env = dict(ENV, FEDATTN_INJECT_FAULT="1@prefill block 3=kill")
    finished = networked([*words(3, ["--sync-every", "2"]), "--timeout", str(timeout)], env=env)
    assert finished.returncode == 3
    lines = finished.stderr.strip().splitlines()
    assert "party-2 (rank 1): killed by SIGKILL" in finished.stderr
    for name, rank in (("party-1", 0), ("publisher", 2)):
        line = next(line for line in lines if line.strip().startswith(f"{name} (rank {rank})"))
        assert "exit code 3" in line
        assert "party-2 (rank 1) is gone (last seen at prefill block 3)" in line
        after = float(re.search(r"([\d.]+) s after the first failure", line).group(1))
        assert after <= timeout + 10
    assert "Traceback" not in finished.stderr
    assert not leftover_parties()


def test_a_stalled_party_is_named_and_the_others_stop():
    timeout = 4
    env = dict(ENV, FEDATTN_INJECT_FAULT="0@prefill block 2=stall")
    start = time.monotonic()
    finished = networked([*words(3, ["--sync-every", "2"]), "--timeout", str(timeout)], env=env)
    assert finished.returncode == 3
    assert "party-1 (rank 0) made no progress for 4 s (it is alive, at prefill block 2)" in finished.stderr
    assert "party-1 (rank 0): killed by SIGKILL" in finished.stderr  # the launcher ends the stalled one
    assert time.monotonic() - start < 60
    assert not leftover_parties()


def test_killing_the_launcher_leaves_no_orphans():
    env = dict(ENV, FEDATTN_INJECT_FAULT="0@prefill block 2=stall")
    command = [sys.executable, "-m", "fedattn.cli", *words(3, []), "--transport", "torch", "--timeout", "60"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while len(leftover_parties()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(leftover_parties()) == 3
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while leftover_parties() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leftover_parties()


def test_under_torchrun_each_rank_reads_only_its_own_file(capsys, tmp_path):
    for rank, text in enumerate(CONTEXTS[:2]):
        (tmp_path / f"party-{rank}.txt").write_text(text)
    (tmp_path / "question.txt").write_text(QUESTION)
    reference = in_process(
        capsys,
        [
            "run",
            "--model",
            "tiny-random",
            "--max-new-tokens",
            "6",
            "--question",
            QUESTION,
            "--context",
            CONTEXTS[0],
            "--context",
            CONTEXTS[1],
        ],
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [
        torchrun,
        "--nproc-per-node",
        "3",
        "--master-port",
        "29731",
        "-m",
        "fedattn.cli",
        "participant",
        "--model",
        "tiny-random",
        "--max-new-tokens",
        "6",
        "--report",
        f"{tmp_path}/report-{{rank}}.json",
        "--context",
        f"@{tmp_path}/party-{{rank}}.txt",
        "--question",
        f"@{tmp_path}/question.txt",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)
    assert finished.returncode == 0, finished.stderr[-2000:]
    publisher = json.loads((tmp_path / "report-2.json").read_text())
    assert publisher["name"] == "publisher"
    assert publisher["answer_token_ids"] == reference["answer_token_ids"]
