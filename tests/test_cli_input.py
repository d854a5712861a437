"""The CLI tried as a careless user would: every value the runtime cannot honour ends as ONE line
``fedattn: error: ...`` on stderr and exit code 2, without a traceback, and (where the value alone
decides) at parse time, naming the option. Also: options turned back into words re-create the
same run, and library errors say what is wrong with a value rather than which flag held it."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

from fedattn.argtypes import option_words
from fedattn.cli.main import main, parse_words
from fedattn.cli.run import shared_words
from fedattn.errors import FedAttnError
from fedattn.network.federation import free_loopback_addresses, init_federation
from fedattn.runtime.decoding import Decoding
from fedattn.runtime.devices import resolve_device
from fedattn.systems.fedattn.config import SHARED_OPTIONS
from fedattn.systems.fedattn.exchange import Exchange
from fedattn.systems.fedattn.schedule import check_layers, parse_layers
from fedattn.systems.fedattn.sparsity import Sparsity

RUN = ["run", "--model", "tiny-random", "--max-new-tokens", "2", "--context", "Alice has a cat.", "--question", "Who?"]
EVAL = ["eval", "gsm8k", "--model", "tiny-random", "--limit", "1", "--shots", "1", "--parties", "2"]
ATTACK = ["attack", "--model", "tiny-random", "--count", "1", "--train-tokens", "300"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def refused(capsys, argv: list[str]) -> str:
    """The one stderr line of a refused command line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.out, captured.err)
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""  # nothing ran (a sweep did not even announce a point)
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedattn: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
        (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
        (["--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
        (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got -1"),
        (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got nan"),
        (["--temperature", "inf"], "argument --temperature: must be a finite number >= 0, got inf"),
        (["--ratio-comp", "0"], "argument --ratio-comp: ratio must be in (0, 1], got 0"),
        (["--kv-codec", "bogus"], "argument --kv-codec: unknown KV codec 'bogus'"),
        (["--kv-budget", "1"], "--kv-budget 1 bytes cannot carry one token"),
        (["--kv-noise", "inf"], "argument --kv-noise: must be a finite number >= 0, got inf"),
        (["--kv-noise", "1e300"], "K/V noise of sigma 1e+300 overflows torch.float32: the noisy K/V are not finite"),
        (["--sync-layers", "1,x"], "argument --sync-layers: expected comma-separated block indices or ranges"),
        (["--sync-layers", "99"], "--sync-layers: block 99 is out of range: the model has blocks 0..7"),
        (["--sync-layers", ""], "argument --sync-layers: '' names no block"),
        (["--publisher-layers", "5-2"], "argument --publisher-layers: the range 5-2 runs backwards"),
        (["--publisher-layers", "3,8"], "--publisher-layers: block 8 is out of range"),
        (["--sync-every", "0"], "argument --sync-every: must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
        (["--max-new-tokens", "100000000"], "exceeds the model's context of 4096 positions"),
        (["--timeout", "0"], "argument --timeout: must be a finite number > 0, got 0"),
        (["--timeout", "nan"], "argument --timeout: must be a finite number > 0, got nan"),
        (["--timeout", "inf"], "argument --timeout: must be a finite number > 0, got inf"),
        (["--device", "tpu"], "argument --device: must be cpu, cuda, cuda:N or mps, got 'tpu'"),
        (["--device", "cuda:x"], "argument --device: must be cpu, cuda, cuda:N or mps"),
        (["--seed", str(2**64)], "argument --seed: must be in -2147483648..4294967295"),
        (["--model", "/nonexistent"], "unknown model '/nonexistent'"),
        (["--schedule", "retrieval", "--sync-every", "2"], "sets the sync blocks itself"),
    ],
)
def test_run_refuses(capsys, extra, message):
    assert message in refused(capsys, [*RUN, *extra])


def test_texts_that_cannot_be_read(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert refused(capsys, [*RUN, "--context", f"@{empty}"]).endswith("context 2 is empty")
    line = refused(capsys, [*RUN[:-2], "--question", f"@{tmp_path}"])
    assert line.startswith(f"fedattn: error: argument --question: cannot read @{tmp_path}: ")
    assert refused(capsys, [*RUN, "--publisher-context", "@"]).startswith(
        "fedattn: error: argument --publisher-context"
    )


def test_a_device_this_machine_lacks(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert refused(capsys, [*RUN, "--device", "cuda"]).endswith(
        "device 'cuda': this machine has no CUDA device that torch can use"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert refused(capsys, [*RUN, "--device", "cuda:2"]).endswith("device 'cuda:2': this machine has CUDA devices 0..1")
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--limit", "0"], "argument --limit: must be >= 1, got 0"),
        (["--offset", "100000"], "--offset 100000 is past the last of the 1319 GSM8K test problems"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--shots", "100000"], "100000 shots exceed the 7473 GSM8K train problems"),
    ],
)
def test_eval_gsm8k_refuses(capsys, tmp_path, extra, message):
    assert message in refused(capsys, [*EVAL, "--out", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()  # refused before the results folder records anything


def test_eval_out_that_is_a_file(capsys, tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("not a folder")
    assert "cannot create the results folder" in refused(capsys, [*EVAL, "--out", str(existing)])
    crossfacts = ["eval", "crossfacts", "--model", "tiny-random", "--out", str(tmp_path / "c"), "--offset", "200"]
    assert "--offset 200 is past the last item (99)" in refused(capsys, crossfacts)


def test_eval_drift_refuses(capsys, tmp_path):
    drift = ["eval", "drift", "--model", "tiny-random", "--question", "Who?"]
    assert refused(capsys, [*drift, "--out", str(tmp_path)]).endswith(
        f"argument --out: {tmp_path} is a folder, not a file"
    )
    line = refused(capsys, [*drift[:4], "--gsm8k-item", "99999"])
    assert line.endswith("argument --gsm8k-item: GSM8K test items are 0..1318, got 99999")
    line = refused(capsys, [*drift[:4], "--gsm8k-item", "-1"])
    assert line.endswith("argument --gsm8k-item: expected K, a range K-M or a list of them, got '-1'")
    assert "--gsm8k-item replaces --context/--question" in refused(capsys, [*drift, "--gsm8k-item", "1"])


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "cannot read"),
        ("[[", "is not valid TOML"),
        ("benchmark = 'nope'\nout = 'x'", "'benchmark' must be one of gsm8k, crossfacts"),
        ("benchmark = 'gsm8k'", "'out' (the folder for the results) is required"),
        ("benchmark = 'gsm8k'\nout = 'x'\ngrdi = 1", "unknown key 'grdi'"),
        ("benchmark = 'gsm8k'\nout = 'x'\n[base]\nout = 'y'", "base.out"),
        ("benchmark = 'gsm8k'\nout = 'x'\n[grid]\nsync_every = 4", "grid.sync_every must be a non-empty list"),
        ("benchmark = 'gsm8k'\nout = 'x'\n[base]\nbogus_option = 3", "unrecognized arguments: --bogus-option 3"),
        ("benchmark = 'gsm8k'\nout = 'x'\n[grid]\nsync_every = [2, 0]", "argument --sync-every: must be >= 1, got 0"),
    ],
)
def test_sweep_refuses(capsys, tmp_path, text, message):
    config = tmp_path / "sweep.toml"
    if text is not None:
        config.write_text(text)
    assert message in refused(capsys, ["sweep", str(config)])  # the whole grid is parsed before any point runs


@pytest.mark.parametrize("command", ["plot", "compare"])
def test_plot_and_compare_refuse(capsys, tmp_path, command):
    assert refused(capsys, [command, str(tmp_path / "missing")]).endswith(
        f"argument RESULTS: no such file or folder: {tmp_path / 'missing'}"
    )
    assert refused(capsys, [command, str(tmp_path)]).endswith(
        "no result folder with a summary.json among the given paths"
    )
    existing_file = tmp_path / "notes.txt"
    existing_file.write_text("not a folder")
    out, message = (
        (existing_file, "is a file, not a folder") if command == "plot" else (tmp_path, "is a folder, not a file")
    )
    assert refused(capsys, [command, str(tmp_path), "--out", str(out)]).endswith(f"argument --out: {out} {message}")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--blocks", "99"], "--blocks: block 99 is out of range: the model has blocks 0..7"),
        (["--blocks", "x"], "argument --blocks: expected comma-separated block indices"),
        (["--kv-codec", "bogus"], "argument --kv-codec: unknown KV codec 'bogus'"),
        (["--device", "tpu"], "argument --device: must be cpu, cuda, cuda:N or mps"),
        (["--noise", "nan"], "argument --noise: must be a finite number >= 0, got nan"),
        (["--source", "gsm8k", "--count", "5000"], "--count 5000 is more than the 1319 GSM8K test questions"),
    ],
)
def test_attack_refuses(capsys, tmp_path, extra, message):
    assert message in refused(capsys, [*ATTACK, "--out", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank", "-1"], "argument --rank: must be >= 0, got -1"),
        (["--rank", "x"], "argument --rank: not an integer: 'x'"),
        (["--rank", "5"], "--rank must be in 0..1, got 5"),
        (["--master", "nohost"], "argument --master: must be HOST:PORT with a port in 1..65535, got 'nohost'"),
        (["--master", "h:99999"], "argument --master: must be HOST:PORT with a port in 1..65535, got 'h:99999'"),
        (["--master", ":1234"], "argument --master: must be HOST:PORT"),
        (["--world-size", "0"], "argument --world-size: must be >= 1, got 0"),
    ],
)
def test_participant_refuses(capsys, monkeypatch, extra, message):
    monkeypatch.setattr("fedattn.network.meeting.exit_now", lambda code: None)
    words = ["participant", "--rank", "0", "--world-size", "2", "--master", "127.0.0.1:1", "--model", "tiny-random"]
    assert message in refused(capsys, [*words, "--context", "c", *extra])


@pytest.fixture
def roster_file(tmp_path):
    """A federation of party-1, party-2 and publisher in which only party-1 may start queries."""
    names = ["party-1", "party-2", "publisher"]
    init_federation(tmp_path / "federation", names, free_loopback_addresses(3), ["party-1"])
    return str(tmp_path / "federation" / "roster.toml")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--name", "zed"], "zed is not in the federation's roster (party-1, party-2, publisher)"),
        (
            ["--name", "party-1"],
            "publisher would start the query but may not start queries in this federation "
            "(may_start = false in the roster)",
        ),
        (
            ["--name", "publisher", "--parties", "party-2,party-1"],
            "--name publisher is not one of the run's parties (party-2, party-1)",
        ),
        (["--name", "party-2", "--parties", "party-2,party-2"], "party-2 is named more than once"),
        (["--name", "party-1", "--rank", "0"], "--roster (gRPC) and --rank (gloo) exclude each other"),
        (["--name", "party-1", "--master", "127.0.0.1:1"], "--roster (gRPC) and --master (gloo) exclude each other"),
        (["--name", "party-1", "--external-store"], "--roster (gRPC) and --external-store (gloo) exclude each other"),
    ],
)
def test_participant_in_a_federation_refuses(capsys, monkeypatch, roster_file, extra, message):
    monkeypatch.setattr("fedattn.network.meeting.exit_now", lambda code: None)
    words = ["participant", "--model", "tiny-random", "--context", "c", "--roster", roster_file]
    assert message in refused(capsys, [*words, *extra])


def test_participant_needs_both_roster_and_name(capsys, monkeypatch, roster_file):
    monkeypatch.setattr("fedattn.network.meeting.exit_now", lambda code: None)
    words = ["participant", "--model", "tiny-random", "--context", "c"]
    for extra in (["--name", "party-1"], ["--roster", roster_file], ["--parties", "party-1,publisher"]):
        assert refused(capsys, [*words, *extra]).endswith(
            "a party in a federation needs both --roster FILE and --name NAME"
        )
    mixed = refused(capsys, [*words, "--parties", "party-1,publisher", "--world-size", "2"])
    assert mixed.endswith(
        "--parties (gRPC) and --world-size (gloo) exclude each other: a party joins a federation "
        "(--roster, --name, --parties) or a rendezvous (--rank, --world-size, --master)"
    )


def test_participant_settings_from_the_environment(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("fedattn.network.meeting.exit_now", lambda code: None)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    words = ["participant", "--model", "tiny-random", "--context", "c"]
    assert refused(capsys, words).endswith("--rank is required (or $RANK)")
    monkeypatch.setenv("RANK", "one")
    assert refused(capsys, words).endswith("$RANK: not an integer: 'one'")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert refused(capsys, words).endswith("--master HOST:PORT is required (or MASTER_ADDR and MASTER_PORT)")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "0")
    assert refused(capsys, words).endswith(
        "$MASTER_ADDR:$MASTER_PORT: must be HOST:PORT with a port in 1..65535, got '127.0.0.1:0'"
    )
    assert refused(capsys, [*words, "--report", str(tmp_path)]).endswith(
        f"argument --report: {tmp_path} is a folder, not a file"
    )


def test_install_nonsense(capsys):
    assert "unknown model 'nonsense'; installable: " in refused(capsys, ["install", "nonsense"])


def test_an_unreachable_rendezvous_store_is_one_line():
    """torch's C++ side would print a page of log and stack frames before our error; the CLI
    keeps it to fatal errors (the variable is read once, when torch loads: hence a fresh process)."""
    result = subprocess.run(
        [sys.executable, "-m", "fedattn.cli", "participant", "--rank", "1", "--world-size", "2"]
        + ["--master", "127.0.0.1:1", "--model", "tiny-random", "--question", "q", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedattn: error: cannot reach the rendezvous store at 127.0.0.1:1")


def test_a_networked_run_refused_by_every_party_is_one_line(capsys):
    """A mistake only the model can reveal (a block it lacks) is made once, in the shared options:
    every party refuses it alike, and the launcher says so once, as a usage error."""
    line = refused(capsys, [*RUN, "--transport", "torch", "--sync-layers", "0,99", "--timeout", "5"])
    assert line == "fedattn: error: --sync-layers: block 99 is out of range: the model has blocks 0..7"


@pytest.mark.parametrize("transport", ["torch", "grpc"])
def test_a_networked_run_every_party_refuses_in_its_own_words_is_a_usage_error(capsys, transport):
    """Each party's own prompt is longer than the model's context, so each refuses with its own
    token count: still the user's mistake (exit 2), said once per party in one line. Each text is
    over 64 KiB, more than a pipe holds: handing it to its party must not block."""
    collaborator, publisher = "word " * 14000, "why " * 14000
    argv = ["run", "--model", "tiny-random", "--context", collaborator, "--question", publisher]
    line = refused(capsys, [*argv, "--transport", transport, "--timeout", "5"])
    assert re.fullmatch(
        r"fedattn: error: every party refused the run: "
        r"party-1 \(rank 0\): the prompt has (\d+) tokens; .* context of 4096 positions; "
        r"publisher \(rank 1\): the prompt has (\d+) tokens; .* context of 4096 positions",
        line,
    ), line


def test_the_launcher_checks_the_options_once_before_starting_any_party(capsys, monkeypatch):
    def no_launch(*args):
        raise AssertionError("a party was started")

    monkeypatch.setattr("fedattn.network.launcher.launch_local", no_launch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in refused(capsys, [*RUN, "--transport", "torch", "--device", "cuda"])
    assert refused(capsys, [*RUN[:6], "", *RUN[7:], "--transport", "torch"]).endswith("context 1 is empty")


# ---------------------------------------------------------------------------------------------
# Options back into words


def test_shared_options_round_trip_through_words():
    """What the launcher hands each party re-creates exactly the parent's run options."""
    given = [
        *RUN,
        *["--sync-layers", "0,3-5", "--publisher-layers", "6-7", "--publisher-sync-every", "3"],
        *["--ratio-comp", "0.5", "--ratio-comm", "0.25", "--ratio-comp-publisher", "0.75"],
        *["--ratio-comm-publisher", "1", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9"],
        *["--seed", "-3", "--kv-codec", "int8", "--kv-select", "key-norm", "--kv-budget", "90000"],
        *["--kv-noise", "0.1", "--dtype", "bfloat16", "--device", "cpu", "--all-answers", "--raw", "--timeout", "7.5"],
    ]
    parent = parse_words(given)
    words = shared_words(parent)
    assert "--json" not in words
    child = parse_words(["participant", *words])
    for name in SHARED_OPTIONS:
        assert getattr(child, name) == getattr(parent, name), name
    assert parent.sync_layers == (0, 3, 4, 5) and parent.seed == -3 and parent.raw is True


def test_option_words():
    assert option_words({"sync_every": 4, "all_answers": True, "raw": False, "top_k": None}) == [
        "--sync-every",
        "4",
        "--all-answers",
    ]
    assert option_words({"sync_layers": (0, 4), "ratio_comm": 0.5}) == ["--sync-layers", "0,4", "--ratio-comm", "0.5"]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Decoding(temperature=-1.0),
        lambda: Decoding(temperature=math.nan),
        lambda: Decoding(top_p=0.0),
        lambda: Decoding(top_k=0),
        lambda: Sparsity(comp=0.0),
        lambda: Sparsity(comm_publisher=1.5),
        lambda: Exchange(select="loudest"),
        lambda: Exchange(budget=0),
        lambda: Exchange(noise=math.inf),
        lambda: parse_layers("1,x"),
        lambda: check_layers((9,), 8),
    ],
)
def test_library_errors_name_no_option(build):
    """A library caller typed no flag: the error says what is wrong with the value."""
    with pytest.raises(FedAttnError) as raised:
        build()
    assert "--" not in str(raised.value), raised.value
