"""Networked runs (one process per party on loopback, over gloo and over gRPC with mutual TLS)
against the in-process engine, their behaviour when a party dies or stalls, and the launcher's
care for private text (never on disk, nor on a command line) and for its children."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from networked_cases import CONTEXTS, QUESTION, SAME_AS_IN_PROCESS, configured, expected_link_bytes, words

from fedattn.cli.main import main
from fedattn.network.federation import free_loopback_addresses, init_federation
from fedattn.network.grpc_transport import GRPC_MESSAGE_PREFIX

MARK = f"test-networked-{os.getpid()}"  # in every process this file starts: others' runs are not ours to count
ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", FEDATTN_TEST_MARK=MARK)
TRANSPORTS = ("torch", "grpc")
# per copy of a frame on a link: over gloo the int64 size word and the end mark after the frame;
# over gRPC the message's prefix (a compression flag and a 4-byte length)
COPY_FRAMING = {"torch": 8 + 1, "grpc": GRPC_MESSAGE_PREFIX}


def in_process(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


HANG_S = 300  # a run still going after this hangs (start-up alone takes a minute on a busy 2-core machine)


def launch_words(argv: list[str], transport: str) -> list[str]:
    return [sys.executable, "-m", "fedattn.cli", *argv, "--transport", transport]


def networked(argv: list[str], transport: str, timeout: float = HANG_S, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_words(argv, transport), capture_output=True, text=True, timeout=timeout, env=env or ENV
    )


def leftover_parties() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "fedattn.cli" in cmdline and "participant" in cmdline and _started_here(process):
            found.append(process)
    return found


def _started_here(process: psutil.Process) -> bool:
    try:
        return process.environ().get("FEDATTN_TEST_MARK") == MARK
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


# test_grpc_transport runs every case in threads over gRPC, for the tokens and bytes of each schedule,
# codec and exchange (the transports only move frames). Launched processes run the cases that differ in
# what crosses the links or the processes: over gloo, four parties that all answer (float32 frames and
# the first token to everyone), a compressed codec with attention selection and seeded noise (frames of
# partial segments, the same noise drawn in every process), and seeded sampling at the publisher alone;
# over gRPC, the start-up, the launcher's throwaway federation and the report, with the richest case.
# test_cli_input proves that the launcher hands every shared option to its children.
LAUNCHED = {"torch": (3, 5, 6), "grpc": (5,)}


@pytest.mark.parametrize(
    "transport,parties,options",
    [
        pytest.param(transport, *SAME_AS_IN_PROCESS[index], id=f"{transport}-case{index}")
        for transport, indices in LAUNCHED.items()
        for index in indices
    ],
)
def test_same_answer_and_bytes_as_in_process(capsys, transport, parties, options):
    argv = words(parties, options)
    reference = in_process(capsys, argv)
    finished = networked([*argv, "--json"], transport)
    assert finished.returncode == 0, finished.stderr
    merged = json.loads(finished.stdout)
    assert merged["answer_token_ids"] == reference["answer_token_ids"]
    for ours, theirs in zip(merged["participants"], reference["participants"]):
        assert ours["tokens"] == theirs["tokens"]
        assert ours["bytes_sent"] == theirs["bytes_sent"] == ours["expected_bytes_sent"]
        assert ours["bytes_received"] == theirs["bytes_received"] == ours["expected_bytes_received"]
        if "answer" in theirs:
            assert ours["answer"] == theirs["answer"]
    lengths = [party["tokens"] for party in reference["participants"]]
    loaded, config = configured(options)
    links = expected_link_bytes(loaded.model.config, config, lengths, COPY_FRAMING[transport])
    assert [party["link_bytes_sent"] for party in merged["participants"]] == links
    assert merged["measured_bytes"]["link_sent"] == sum(links)
    if "--all-answers" not in options:
        assert merged["measured_bytes"]["sent"] < merged["all_gather_bytes_sent"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_segments_that_together_exceed_the_context_are_refused_as_in_process(capsys, transport):
    """Each party's segment fits alone; only the hellos reveal that together they do not."""
    long_contexts = [f"Record {n}: " + "x" * 2100 for n in range(2)]  # tiny-random: 4096 positions, a byte a token
    argv = ["run", "--model", "tiny-random", "--max-new-tokens", "6", "--question", QUESTION]
    for context in long_contexts:
        argv += ["--context", context]
    assert main(argv) == 2
    refusal = capsys.readouterr().err.strip()
    assert "exceeds the model's context of 4096 positions" in refusal
    finished = networked(argv, transport)
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.strip() == refusal  # every party refused with the in-process message
    assert not leftover_parties()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_party_killed_mid_prefill_stops_everyone_within_the_bound(transport):
    """Every survivor, a collaborator and the publisher, names the dead party and stops in time."""
    timeout = 8
    env = dict(ENV, FEDATTN_INJECT_FAULT="1@prefill block 3=kill")
    finished = networked([*words(3, ["--sync-every", "2"]), "--timeout", str(timeout)], transport, env=env)
    assert finished.returncode == 3, finished.stderr
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stalled_party_is_named_and_the_others_stop(transport):
    timeout = 4
    env = dict(ENV, FEDATTN_INJECT_FAULT="0@prefill block 2=stall")
    start = time.monotonic()
    finished = networked([*words(3, ["--sync-every", "2"]), "--timeout", str(timeout)], transport, env=env)
    assert finished.returncode == 3, finished.stderr
    assert "party-1 (rank 0) made no progress for 4 s (it is alive, at prefill block 2)" in finished.stderr
    assert "party-1 (rank 0): killed by SIGKILL" in finished.stderr  # the launcher ends the stalled one
    assert time.monotonic() - start < 60
    assert not leftover_parties()


def stalled_launch(transport: str, env: dict, parties: int = 3) -> subprocess.Popen:
    """A launched run of ``parties`` whose first stalls at prefill block 2 (it lasts until stopped),
    once all of them are connected (so each has read its words and loaded the model)."""
    env = dict(env, FEDATTN_INJECT_FAULT="0@prefill block 2=stall")
    command = [*launch_words(words(parties, []), transport), "--timeout", "60"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + HANG_S
    while sum(map(connected, leftover_parties())) < parties and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sum(map(connected, leftover_parties())) == parties
    return launcher


def connected(party: psutil.Process) -> bool:
    try:
        return bool(party.net_connections(kind="inet"))
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def wait_for_no_leftover_parties(bound_s: float = 10) -> None:
    deadline = time.monotonic() + bound_s
    while leftover_parties() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leftover_parties()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_killing_the_launcher_leaves_no_orphans(transport):
    """Its children die with it (the parent-death signal): a collaborator and the publisher suffice."""
    launcher = stalled_launch(transport, ENV, parties=2)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    wait_for_no_leftover_parties()


def files_holding(folder: Path, secrets: list[bytes]) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        try:
            content = path.read_bytes() if path.is_file() else b""
        except OSError:
            continue
        if any(secret in content for secret in secrets):
            found.append(path)
    return found


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_private_text_never_reaches_the_disk_and_sigterm_cleans_up(tmp_path, transport):
    """While the parties run, no file under the temporary folders (TMPDIR, for the launcher and its
    children) and no command line holds a party's text; SIGTERM to the launcher ends its children
    and removes its temporary folder."""
    secrets = [text.encode() for text in (*CONTEXTS[:2], QUESTION)]
    launcher = stalled_launch(transport, dict(ENV, TMPDIR=str(tmp_path)))
    try:
        ours = [entry for entry in tmp_path.iterdir() if entry.name.startswith("fedattn-")]
        assert len(ours) == (1 if transport == "grpc" else 0)  # the throwaway CA's folder; gloo needs none
        for _ in range(10):  # the parties read their words at start-up, and keep running
            assert files_holding(tmp_path, secrets) == []
            command_lines = " ".join(word for party in leftover_parties() for word in party.cmdline())
            assert not any(secret.decode() in command_lines for secret in secrets)
            time.sleep(0.3)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == -signal.SIGTERM
    finally:
        launcher.kill()
    assert not [entry for entry in tmp_path.iterdir() if entry.name.startswith("fedattn-")]
    wait_for_no_leftover_parties()


def test_parties_started_by_hand_over_a_roster_run_the_parties_given(capsys, tmp_path):
    """A roster of three, a run of two (--parties, in rank order): each party finds its rank from its
    name, and the run answers as the same two parties do in-process."""
    names = ["party-1", "party-2", "publisher"]
    init_federation(tmp_path / "fed", names, free_loopback_addresses(3), ["publisher"])
    reference = in_process(capsys, words(2, []))
    common = ["participant", "--model", "tiny-random", "--max-new-tokens", "6", "--timeout", "60"]
    common += ["--roster", str(tmp_path / "fed" / "roster.toml"), "--parties", "party-2,publisher", "--json"]
    own = {"party-2": ["--context", CONTEXTS[0]], "publisher": ["--question", QUESTION]}
    parties = [
        subprocess.Popen(
            [sys.executable, "-m", "fedattn.cli", *common, "--name", name, *own[name]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for name in own
    ]
    try:
        outputs = [party.communicate(timeout=HANG_S) for party in parties]
    finally:
        for party in parties:
            party.kill()
    assert [party.returncode for party in parties] == [0, 0], [err for _, err in outputs]
    party_2, publisher = (json.loads(out) for out, _ in outputs)
    assert [party["name"] for party in party_2["parties"] + publisher["parties"]] == ["party-2", "publisher"]
    assert "gRPC" in publisher["transport"] and "TLS" in publisher["transport"]
    assert publisher["answer_token_ids"] == reference["answer_token_ids"]
    assert [party_2["parties"][0]["bytes_sent"], publisher["parties"][0]["bytes_sent"]] == [
        party["bytes_sent"] for party in reference["participants"]
    ]


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
    finished = subprocess.run(command, capture_output=True, text=True, timeout=HANG_S, env=ENV)
    assert finished.returncode == 0, finished.stderr[-2000:]
    publisher = json.loads((tmp_path / "report-2.json").read_text())
    assert [party["name"] for party in publisher["parties"]] == ["publisher"]  # a rank reports its own party
    assert publisher["answer_token_ids"] == reference["answer_token_ids"]
