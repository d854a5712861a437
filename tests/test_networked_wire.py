"""Hostile and mismatched peers over real processes and loopback gloo.

A real publisher (``fedattn participant``, rank 1) faces ``fake_peer.py`` as rank 0: a valid
handshake, then one bad message. The publisher must refuse it at once with its own one-line error
naming the sender (and the block, for a K/V frame), exit non-zero without a traceback, and never
hang: every wait here has a hard bound, so a hang fails the test instead of blocking the suite.
The test serves the rendezvous store itself (port 0: every case gets a fresh port).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch.distributed as dist
from fake_peer import FRAMING_CASES

from fedattn.errors import EXIT_PEER_FAILURE, EXIT_USAGE

FAKE_PEER = Path(__file__).with_name("fake_peer.py")
PEER_TIMEOUT_S = 8  # the publisher's --timeout: its liveness fallback for a silent peer
HARD_TIMEOUT_S = 120  # a process still running after this is a hang (start-up on a busy machine takes a minute)
PROMPT_REJECT_S = PEER_TIMEOUT_S / 2  # bad message sent -> publisher gone: a refusal, not the timeout
SHARED = ["--model", "tiny-random", "--sync-every", "1", "--max-new-tokens", "4", "--timeout", str(PEER_TIMEOUT_S)]
ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
QUESTION = "What is Alice's locker code?"
CONTEXT = "Alice's locker code is 4417."

# case -> what the publisher's one line must contain, besides the sender
KV_FRAME = "bad KV frame from party-1 at block 0: "
EXPECTED = {
    "dtype": KV_FRAME + "codec bfloat16, the run agreed on float32",
    "heads": KV_FRAME + "shape 3 KV heads x 16, the model has 2 x 16",
    "zero-tokens": KV_FRAME + "0 tokens, expected 1..6",
    "size-mismatch": KV_FRAME + "1554 bytes where its header implies 1558",
    "nan": KV_FRAME + "non-finite values",
    "out-of-order": KV_FRAME + "it is for block 1, out of order",
    "truncated": "party-1 sent a truncated frame: fewer bytes than the 1558 its size word announced",
    "oversized": "party-1 announced a 1064983-byte frame; frames are 1..1064982 bytes",
    "negative-size": "party-1 announced a -5-byte frame",
    "zero-size": "party-1 announced a 0-byte frame",
    "short-size-word": "party-1 announced a -4294967196-byte frame",  # 4 bytes came; the rest stay set
    "model-mismatch": "handshake refused: party-1 (rank 0) differs from rank 1 in model weights",
    "zero-segment": "bad frame from party-1 (handshake): segment length 0, expected 1..",
    "long-segment": "bad frame from party-1 (handshake): segment length 5000, the model's context is 4096 positions",
}


@pytest.fixture
def store_port():
    """A rendezvous store served by the test, so that no party has to host it."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    yield store.port
    del store


def participant(
    rank: int,
    port: int,
    own: list[str],
    model: str = "tiny-random",
    world_size: int = 2,
    extra: Sequence[str] = ("--external-store",),
    env: dict[str, str] = ENV,
) -> subprocess.Popen:
    """``fedattn participant`` with the shared options; ``extra`` comes last, so it may override them."""
    shared = list(SHARED)
    shared[1] = model
    command = [
        sys.executable,
        "-m",
        "fedattn.cli",
        "participant",
        "--rank",
        str(rank),
        "--world-size",
        str(world_size),
        "--master",
        f"127.0.0.1:{port}",
        *own,
        *shared,
        *extra,
        "--json",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def fake_peer(case: str, port: int) -> subprocess.Popen:
    command = [sys.executable, str(FAKE_PEER), case, str(port), "--", *SHARED]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


@contextmanager
def killed_at_exit(*processes: subprocess.Popen):
    """Whatever happens in the test, no process it started outlives it."""
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


def wait_all(processes: list[subprocess.Popen]) -> list[float]:
    """Each process's exit time (time.time()); fails the test if any is still running at the bound."""
    deadline = time.monotonic() + HARD_TIMEOUT_S
    exited = [None] * len(processes)
    while None in exited:
        for index, process in enumerate(processes):
            if exited[index] is None and process.poll() is not None:
                exited[index] = time.time()
        if time.monotonic() > deadline:
            running = [process.args[2:6] for process in processes if process.poll() is None]
            pytest.fail(f"still running after {HARD_TIMEOUT_S} s (a hang): {running}")
        time.sleep(0.02)
    return exited


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fedattn: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# Over gloo, in real processes: gloo's own framing (a frame without its end mark; a size word over the
# limit, at zero, and short, which reads as negative: a negative word is the same check), and one K/V
# frame and one hello whose content is bad (the path from gloo to the frame checks and on to a
# one-line exit 3 is the same for every content defect). Every content case, each with its message
# here, runs in test_grpc_wire (threads); the model mismatch's exit 2 from real processes is
# test_a_real_model_mismatch_is_refused_at_the_handshake_by_both_ranks.
OVER_GLOO = (*(case for case in FRAMING_CASES if case != "negative-size"), "size-mismatch", "long-segment")


@pytest.mark.parametrize("case", OVER_GLOO)
def test_a_bad_message_is_refused_at_once_with_its_own_error(store_port, case):
    publisher = participant(1, store_port, ["--question", QUESTION])
    fake = fake_peer(case, store_port)
    with killed_at_exit(publisher, fake):
        (exited,) = wait_all([publisher])
        fake.kill()
        fake_out, _ = fake.communicate()
        out, err = publisher.communicate()
        assert "Traceback" not in fake_out, fake_out
        sent = re.search(r"fake: (?:sent|hello sent) .* at ([\d.]+)", fake_out)
        assert sent, f"the fake never got to send its message:\n{fake_out}\npublisher: {err}"
        line = one_error_line(err)
        assert publisher.returncode == EXIT_PEER_FAILURE, (publisher.returncode, err)  # a peer's failure
        assert EXPECTED[case] in line, line
        assert "party-1" in line
        assert exited - float(sent.group(1)) < PROMPT_REJECT_S, f"took {exited - float(sent.group(1)):.1f} s: {line}"
        assert out == ""


def test_a_real_model_mismatch_is_refused_at_the_handshake_by_both_ranks(store_port, tmp_path):
    from fedattn.runtime.tiny_model import TinyShape, build_tiny_model

    model, tokenizer = build_tiny_model(TinyShape(seed=1))  # tiny-random's shape, other weights
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    collaborator = participant(0, store_port, ["--context", CONTEXT])
    publisher = participant(1, store_port, ["--question", QUESTION], model=str(tmp_path))
    with killed_at_exit(collaborator, publisher):
        wait_all([collaborator, publisher])
        results = {rank: process.communicate() for rank, process in enumerate((collaborator, publisher))}
        for rank, (out, err) in results.items():
            line = one_error_line(err)
            assert (collaborator, publisher)[rank].returncode == EXIT_USAGE, err
            assert "handshake refused" in line
            assert line.endswith(" in model weights"), line  # the shape and the settings agree
            assert out == ""
        assert "publisher (rank 1) differs from rank 0 in model weights" in results[0][1]
        assert "party-1 (rank 0) differs from rank 1 in model weights" in results[1][1]
