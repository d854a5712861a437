"""The ``fedattn`` command, in-process with the tiny random model: one-line errors, exit codes, output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedattn.cli.main import main
from fedattn.network.frames import HELLO_FRAME, SMALL_FRAME

FEDATTN = Path(sys.executable).with_name("fedattn")
BASE = ["run", "--model", "tiny-random", "--max-new-tokens", "3"]
CONTEXTS = ["--context", "Alice keeps a cat named Tom.", "--context", "Bob keeps a dog named Rex."]
QUESTION = ["--question", "Who keeps the cat?"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Like the ``tiny`` fixture: the tiny model runs in milliseconds on one thread, far slower on several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(capsys, argv: list[str], *fragments: str) -> str:
    code, out, err = run_cli(capsys, argv)
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedattn: error: "), err
    assert "Traceback" not in err and "Traceback" not in out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_json(capsys, argv: list[str]) -> dict:
    code, out, err = run_cli(capsys, [*argv, "--json"])
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line on stderr


def test_empty_context(capsys):
    assert_usage_error(capsys, [*BASE, "--context", "", *QUESTION], "context 1 is empty")
    assert_usage_error(capsys, [*BASE, "--context", "fine", "--context", "  \n", *QUESTION], "context 2 is empty")


def test_empty_question(capsys):
    assert_usage_error(capsys, [*BASE, *CONTEXTS, "--question", ""], "the question is empty")


def test_unknown_model(capsys):
    assert_usage_error(
        capsys, ["run", "--model", "no-such-model-xyz", *QUESTION], "unknown model 'no-such-model-xyz'", "tiny-random"
    )


def test_sync_block_out_of_range(capsys):
    assert_usage_error(
        capsys,
        [*BASE, *CONTEXTS, *QUESTION, "--sync-layers", "0,99"],
        "--sync-layers: block 99 is out of range",
        "blocks 0..7",
    )


def test_sync_layers_junk(capsys):
    assert_usage_error(
        capsys,
        [*BASE, *CONTEXTS, *QUESTION, "--sync-layers", "0,x"],
        "argument --sync-layers: expected comma-separated block indices or ranges",
    )


@pytest.mark.parametrize(
    "option, value",
    [("--ratio-comm", "0"), ("--ratio-comp", "1.5"), ("--ratio-comm", "-0.1"), ("--ratio-comp-publisher", "2")],
)
def test_ratio_outside_unit_interval(capsys, option, value):
    assert_usage_error(
        capsys, [*BASE, *CONTEXTS, *QUESTION, option, value], option, f"ratio must be in (0, 1], got {value}"
    )


def test_ratio_not_a_number(capsys):
    assert_usage_error(capsys, [*BASE, *CONTEXTS, *QUESTION, "--ratio-comm", "half"], "not a number: 'half'")


def test_prompt_longer_than_the_model_context(capsys):
    # the tiny model has 4096 positions and one token per byte
    long_context = "x" * 5000
    assert_usage_error(
        capsys, [*BASE, "--context", long_context, *QUESTION], "exceeds the model's context of 4096 positions"
    )


def test_missing_file(capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    line = assert_usage_error(capsys, [*BASE, "--context", f"@{missing}", *QUESTION], f"cannot read @{missing}")
    assert "No such file or directory" in line


def test_directory_as_file(capsys, tmp_path):
    line = assert_usage_error(capsys, [*BASE, *CONTEXTS, "--question", f"@{tmp_path}"], f"cannot read @{tmp_path}")
    assert "directory" in line.lower()


def test_placement_with_sync_layers(capsys):
    assert_usage_error(
        capsys,
        [*BASE, *CONTEXTS, *QUESTION, "--placement", "deep-half", "--sync-layers", "0,4"],
        "--placement and --sync-layers exclude each other",
    )


def test_sync_every_with_sync_layers(capsys):
    assert_usage_error(
        capsys, [*BASE, *CONTEXTS, *QUESTION, "--sync-every", "2", "--sync-layers", "0"], "not allowed with"
    )


def test_unknown_kv_codec(capsys):
    assert_usage_error(
        capsys, [*BASE, *CONTEXTS, *QUESTION, "--kv-codec", "int3"], "unknown KV codec 'int3'", "float32", "int4-kivi"
    )


def test_the_old_kv_dtype_option_is_gone(capsys):
    assert_usage_error(
        capsys, [*BASE, *CONTEXTS, *QUESTION, "--kv-dtype", "bfloat16"], "unrecognized arguments: --kv-dtype"
    )


def test_bad_exchange_options(capsys):
    assert_usage_error(capsys, [*BASE, *CONTEXTS, *QUESTION, "--kv-select", "loudest"], "--kv-select", "key-norm")
    assert_usage_error(capsys, [*BASE, *CONTEXTS, *QUESTION, "--kv-budget", "0"], "--kv-budget", "must be >= 1")
    assert_usage_error(capsys, [*BASE, *CONTEXTS, *QUESTION, "--kv-noise", "-1"], "--kv-noise", "finite number >= 0")
    assert_usage_error(capsys, [*BASE, *CONTEXTS, *QUESTION, "--kv-noise", "nan"], "--kv-noise", "finite number >= 0")


def test_budget_too_small_for_one_token_per_frame(capsys):
    line = assert_usage_error(
        capsys,
        [*BASE, *CONTEXTS, *QUESTION, "--sync-every", "4", "--kv-budget", "100"],
        "--kv-budget 100 bytes cannot carry one token",
    )
    assert "K/V frames (at least" in line


def test_missing_question(capsys):
    assert_usage_error(capsys, [*BASE, *CONTEXTS], "required", "--question")


def test_unknown_option_and_no_command(capsys):
    assert_usage_error(capsys, [*BASE, *CONTEXTS, *QUESTION, "--frobnicate"], "unrecognized arguments: --frobnicate")
    assert_usage_error(capsys, [], "required")


# ---------------------------------------------------------------------------------------------
# Happy paths


def test_json_output_with_two_contexts(capsys):
    document = run_json(capsys, [*BASE, *CONTEXTS, *QUESTION])
    assert isinstance(document["answer"], str)
    ids = document["answer_token_ids"]
    assert isinstance(ids, list) and 1 <= len(ids) <= 3 and all(isinstance(i, int) for i in ids)
    assert document["sync_layers"] == [0, 4]  # default H = 4 over 8 blocks
    assert document["publisher_layers"] == []
    parties = document["participants"]
    assert [p["name"] for p in parties] == ["party-1", "party-2", "publisher"]
    for party in parties:
        assert isinstance(party["tokens"], int) and party["tokens"] > 0
        assert party["bytes_sent"] == party["expected_bytes_sent"] > 0
        assert party["bytes_received"] == party["expected_bytes_received"] > 0
    expected = document["expected_bytes"]
    assert expected["sent"] == sum(p["bytes_sent"] for p in parties) == document["measured_bytes"]["sent"]
    assert expected["received"] == sum(p["bytes_received"] for p in parties) == document["measured_bytes"]["received"]
    assert set(document["timing"]) >= {"prefill_s", "decode_s", "wall_s"}
    assert all(value >= 0 for value in document["timing"].values())
    assert document["model"]["name"] == "tiny-random"


def test_sync_every_one_is_centralized(capsys):
    document = run_json(capsys, [*BASE, *CONTEXTS, *QUESTION, "--sync-every", "1"])
    assert document["sync_layers"] == list(range(8))
    for party in document["participants"]:
        assert party["bytes_sent"] == party["expected_bytes_sent"]
        assert party["bytes_received"] == party["expected_bytes_received"]


def test_explicit_sync_layers(capsys):
    document = run_json(capsys, [*BASE, *CONTEXTS, *QUESTION, "--sync-layers", "5,1,3"])
    assert document["sync_layers"] == [1, 3, 5]


def test_publisher_layers_ranges(capsys):
    document = run_json(capsys, [*BASE, *CONTEXTS, *QUESTION, "--publisher-layers", "6-7,2", "--sync-layers", "0"])
    assert (document["sync_layers"], document["publisher_layers"]) == ([0], [2, 6, 7])
    for party in document["participants"]:
        assert party["bytes_sent"] == party["expected_bytes_sent"]


def test_publisher_layers_with_a_named_schedule(capsys):
    assert_usage_error(
        capsys,
        [*BASE, *CONTEXTS, *QUESTION, "--publisher-layers", "1", "--schedule", "publisher-dense"],
        "not allowed with",
    )


def test_publisher_dense_alone(capsys):
    document = run_json(capsys, [*BASE, *CONTEXTS, *QUESTION, "--schedule", "publisher-dense"])
    assert document["sync_layers"] == []
    assert document["publisher_layers"] == list(range(8))
    parties = document["participants"]
    others = len(parties) - 1
    for collaborator in parties[:-1]:
        # a collaborator receives only the other parties' handshakes and the publisher's completion
        assert collaborator["bytes_received"] == others * HELLO_FRAME.size + SMALL_FRAME.size
        assert collaborator["frames_received"] == others + 1
    publisher = parties[-1]
    assert publisher["bytes_received"] > others * HELLO_FRAME.size
    for party in parties:
        assert party["bytes_sent"] == party["expected_bytes_sent"]
        assert party["bytes_received"] == party["expected_bytes_received"]


def test_raw_and_file_contexts(capsys, tmp_path):
    first = tmp_path / "first.txt"
    first.write_text("Alice keeps a cat named Tom.\n", encoding="utf-8")
    question = tmp_path / "question.txt"
    question.write_text("Who keeps the cat?", encoding="utf-8")
    from_files = run_json(
        capsys, [*BASE, "--context", f"@{first}", "--context", "Bob.", "--question", f"@{question}", "--raw"]
    )
    inline = run_json(
        capsys,
        [*BASE, "--context", first.read_text(), "--context", "Bob.", "--question", "Who keeps the cat?", "--raw"],
    )
    assert [p["tokens"] for p in from_files["participants"]] == [
        len(first.read_bytes()),
        len(b"Bob."),
        len(b"Who keeps the cat?"),
    ]  # raw: no chat template, one token per byte
    assert from_files["answer_token_ids"] == inline["answer_token_ids"]
    templated = run_json(capsys, [*BASE, "--context", f"@{first}", "--context", "Bob.", "--question", f"@{question}"])
    assert templated["participants"][0]["tokens"] > from_files["participants"][0]["tokens"]


def test_human_output(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich shortens cells to the terminal width
    code, out, err = run_cli(capsys, [*BASE, *CONTEXTS, *QUESTION])
    assert code == 0, err
    assert "Answer (publisher):" in out
    rows = [line.strip("│ ").split(" ")[0] for line in out.splitlines() if line.startswith("│")]
    assert rows == ["party-1", "party-2", "publisher"] * 2, out  # the traffic table, then the time table
    assert "tiny-random" in out
    assert "Traceback" not in err


def test_human_output_prints_the_answer_verbatim(capsys, monkeypatch):
    import fedattn.systems.fedattn.query

    real = fedattn.systems.fedattn.query.answer_question
    text = "a[/i]b [red]c[/red] [bold]"

    def with_bracketed_answer(*args, **kwargs):
        report = real(*args, **kwargs)
        report.answer = text
        return report

    monkeypatch.setattr(fedattn.systems.fedattn.query, "answer_question", with_bracketed_answer)
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli(capsys, [*BASE, *CONTEXTS, *QUESTION])
    assert code == 0, err
    assert f"Answer (publisher): {text}" in out


def test_names_are_not_shortened_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli(capsys, [*BASE, *CONTEXTS, *QUESTION])
    assert code == 0, err
    code, models, err = run_cli(capsys, ["models"])
    assert code == 0, err
    rows = [line.strip("│ ").split(" ")[0] for line in out.splitlines() if line.startswith("│")]
    assert rows == ["party-1", "party-2", "publisher"] * 2, out
    assert "\u2026" not in out, out
    assert "\u2026" not in models, models


def test_models_lists_tiny_random(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli(capsys, ["models"])
    assert code == 0, err
    assert "tiny-random" in out


# ---------------------------------------------------------------------------------------------
# The real console script


def test_console_script_usage_error():
    assert FEDATTN.exists(), FEDATTN
    result = subprocess.run(
        [str(FEDATTN), "run", "--model", "tiny-random", "--question", ""],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert lines == ["fedattn: error: the question is empty"], result.stderr
    assert result.stdout == ""


def test_every_shared_option_reaches_the_launched_parties():
    """The launcher re-creates each child's options from SHARED_OPTIONS; one left out would make
    children run another configuration (and the handshake refuse it)."""
    import argparse

    from fedattn.systems.fedattn.config import SHARED_OPTIONS, add_options

    parser = argparse.ArgumentParser()
    add_options(parser)
    dests = {action.dest for action in parser._actions if action.dest != "help"}
    assert dests - {"json"} == set(SHARED_OPTIONS)


def test_named_retrieval_schedule(capsys):
    document = run_json(capsys, [*BASE, *CONTEXTS, *QUESTION, "--schedule", "retrieval"])
    assert (document["sync_layers"], document["publisher_layers"], document["kv_codec"]) == (
        list(range(8)),
        [],
        "int4-kivi",
    )
    assert all(document["measured_bytes"][key] == document["expected_bytes"][key] for key in ("sent", "received"))
    overridden = run_json(capsys, [*BASE, *CONTEXTS, *QUESTION, "--schedule", "retrieval", "--kv-codec", "int8"])
    assert overridden["kv_codec"] == "int8"


def test_named_schedule_that_fixes_the_sync_blocks_refuses_others(capsys):
    assert_usage_error(
        capsys,
        [*BASE, *CONTEXTS, *QUESTION, "--schedule", "retrieval", "--sync-every", "2"],
        "sets the sync blocks itself",
    )
