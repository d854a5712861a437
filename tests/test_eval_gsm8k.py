import argparse
import json

import pytest

from fedattn.errors import FedAttnError
from fedattn.evaluation import eval_gsm8k
from fedattn.evaluation.eval_gsm8k import add_arguments, run

FAST = ["--model", "tiny-random", "--device", "cpu", "--shots", "1", "--max-new-tokens", "3"]


def parse(*words):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([*FAST, *words])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def calls(monkeypatch):
    """The segment lengths of every query the evaluation actually runs, in order."""
    seen = []
    real = eval_gsm8k.run_many_in_process

    def counting(model, queries, *rest):
        seen.extend([len(segment) for segment in segments] for segments in queries)
        return real(model, queries, *rest)

    monkeypatch.setattr(eval_gsm8k, "run_many_in_process", counting)
    return seen


def test_defaults_follow_the_paper():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x"])
    assert (args.split, args.parties, args.shots, args.max_new_tokens, args.offset) == ("TokEx", 4, 4, 256, 0)


def test_eval_writes_records_and_summary_and_resumes(tmp_path, calls, capsys):
    out = tmp_path / "run"
    assert run(parse("--out", str(out), "--limit", "3", "--every-answer", "--parties", "3", "--batch-size", "2")) == 0
    assert len(calls) == 3
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [record["key"] for record in records] == ["0", "1", "2"]
    first = records[0]
    assert set(first["answers"]) == {"party-1", "party-2", "publisher"}
    assert first["bytes_sent"] == first["expected_bytes_sent"]  # measured traffic matches the cost model
    assert first["segment_lengths"] == calls[0]
    assert first["gold"] == "18"  # test problem 0: Janet's ducks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 3
    assert set(summary["em"]["parties"]) == {"party-1", "party-2", "publisher"}
    assert summary["em"]["best_collaborator"]["name"] in {"party-1", "party-2"}
    assert summary["config"]["model"]["name"] == "tiny-random" and summary["config"]["model"]["identity"]
    assert "publisher EM" in capsys.readouterr().out

    assert run(parse("--out", str(out), "--limit", "5", "--every-answer", "--parties", "3", "--json")) == 0
    assert len(calls) == 5  # only problems 3 and 4 ran
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [record["index"] for record in records] == [0, 1, 2, 3, 4]
    assert json.loads(capsys.readouterr().out)["count"] == 5


def test_batch_size_changes_no_answer(tmp_path):
    """Decoding problems together gives each the answers it gets alone (the engine's batch test
    covers the tokens; this covers the evaluation's bookkeeping of a batch)."""
    records = {}
    for size in (1, 3):
        out = tmp_path / f"batch-{size}"
        assert (
            run(
                parse(
                    "--out",
                    str(out),
                    "--limit",
                    "3",
                    "--parties",
                    "2",
                    "--every-answer",
                    "--batch-size",
                    str(size),
                    "--max-new-tokens",
                    "12",
                )
            )
            == 0
        )
        records[size] = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    for alone, together in zip(records[1], records[3]):
        assert (together["index"], together["answers"], together["bytes_sent"]) == (
            alone["index"],
            alone["answers"],
            alone["bytes_sent"],
        )
        assert together["batch_size"] == 3 and alone["batch_size"] == 1


def test_another_configuration_on_the_same_folder_is_refused(tmp_path, calls):
    out = str(tmp_path / "run")
    run(parse("--out", out, "--limit", "1", "--parties", "2"))
    with pytest.raises(FedAttnError, match="differs in split"):
        run(parse("--out", out, "--limit", "1", "--parties", "2", "--split", "SemEx"))
    assert len(calls) == 1


def test_an_impossible_split_is_refused_before_the_folder_is_claimed(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FedAttnError, match="1 exemplars cannot be dealt"):
        run(parse("--out", str(out), "--split", "SemEx", "--parties", "4"))
    assert not out.exists()
