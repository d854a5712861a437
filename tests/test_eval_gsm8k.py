import argparse
import json

import pytest

from fedattn.errors import FedAttnError
from fedattn.evaluation.eval_gsm8k import add_arguments, run
from fedattn.evaluation.tasks import gsm8k
from fedattn.evaluation.tasks.gsm8k_scoring import is_correct
from fedattn.report.schema import RunReport
from fedattn.systems.fedattn import system

FAST = ["--model", "tiny-random", "--device", "cpu", "--shots", "1", "--max-new-tokens", "3"]


def parse(*words):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([*FAST, *words])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def calls(monkeypatch):
    """The segments of every query the evaluation actually runs, in order."""
    seen = []
    real = system.run_many_in_process

    def counting(model, queries, *rest):
        seen.extend(queries)
        return real(model, queries, *rest)

    monkeypatch.setattr(system, "run_many_in_process", counting)
    return seen


def records_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_defaults_follow_the_paper():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x"])
    assert (args.split, args.parties, args.shots, args.max_new_tokens, args.offset) == ("TokEx", 4, 4, 256, 0)


def test_eval_writes_records_and_summary_and_resumes(tmp_path, calls, capsys):
    out = tmp_path / "run"
    assert run(parse("--out", str(out), "--limit", "3", "--every-answer", "--parties", "3", "--batch-size", "2")) == 0
    assert len(calls) == 3
    records = records_of(out)
    assert [record["key"] for record in records] == ["0", "1", "2"]
    first = records[0]
    report = RunReport.from_json(first["report"])
    assert [party.name for party in report.parties] == ["party-1", "party-2", "publisher"]
    assert set(first["party_scores"]) == {"party-1", "party-2", "publisher"} and first["answered_by"] == "publisher"
    assert report.measured_bytes["sent"] == report.expected_bytes["sent"]  # measured traffic matches the cost model
    for party in report.parties:
        assert (party.bytes_sent, party.bytes_received) == (party.expected_bytes_sent, party.expected_bytes_received)
    assert [party.details["tokens"] for party in report.parties] == [len(segment) for segment in calls[0]]
    assert first["gold"] == "18"  # test problem 0: Janet's ducks
    assert first["answer"] == report.party("publisher").answer
    for record in records:  # the scores are the task's scorer on the stored answers
        for name, scores in record["party_scores"].items():
            answer = RunReport.from_json(record["report"]).party(name).answer
            assert scores["em"] == is_correct(answer, record["gold"])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["format"], summary["task"], summary["system"], summary["items"]) == (2, "gsm8k", "fedattn", 3)
    assert set(summary["metrics"]["per_party"]) == {"party-1", "party-2", "publisher"}
    assert summary["metrics"]["best_collaborator"]["name"] in {"party-1", "party-2"}
    assert summary["metrics"]["em"] == sum(record["scores"]["em"] for record in records) / 3
    assert (
        summary["bytes_per_query"]
        == summary["expected_bytes_per_query"]
        == pytest.approx(sum(RunReport.from_json(record["report"]).measured_bytes["sent"] for record in records) / 3)
    )
    assert (
        summary["config"]["system"]["model"]["name"] == "tiny-random"
        and summary["config"]["system"]["model"]["identity"]
    )
    assert (summary["settings"]["parties"], summary["settings"]["split"], summary["settings"]["shots"]) == (
        3,
        "TokEx",
        1,
    )
    printed = capsys.readouterr().out
    assert f"EM {summary['metrics']['em']:.1%} over 3 problems" in printed and str(out / "summary.json") in printed

    assert run(parse("--out", str(out), "--limit", "5", "--every-answer", "--parties", "3", "--json")) == 0
    assert len(calls) == 5  # only problems 3 and 4 ran
    assert [record["index"] for record in records_of(out)] == [0, 1, 2, 3, 4]
    assert records_of(out)[:3] == records  # untouched, not recomputed
    assert json.loads(capsys.readouterr().out)["items"] == 5


def test_the_prompt_is_the_papers_few_shot_text(tmp_path, calls, tiny):
    """What the parties hold, concatenated, is exactly ``few_shot_prompt``'s text (TokAg splits the whole)."""
    _, tokenizer = tiny
    out = tmp_path / "run"
    assert run(parse("--out", str(out), "--limit", "1", "--offset", "2", "--split", "TokAg", "--parties", "2")) == 0
    prompt = gsm8k.few_shot_prompt(2, 1)
    expected = tokenizer(prompt.text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert [token for segment in calls[0] for token in segment] == expected
    assert prompt.text.startswith("Question: ") and prompt.question.startswith("\nQuestion: ")


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
        records[size] = records_of(out)
    for alone, together in zip(records[1], records[3]):
        reports = [RunReport.from_json(record["report"]) for record in (alone, together)]
        answers = [{party.name: party.answer_token_ids for party in report.parties} for report in reports]
        traffic = [[party.bytes_sent for party in report.parties] for report in reports]
        assert together["index"] == alone["index"] and answers[0] == answers[1] and traffic[0] == traffic[1]
        assert together["party_scores"] == alone["party_scores"]
        assert together["batch_size"] == 3 and alone["batch_size"] == 1


def test_another_configuration_on_the_same_folder_is_refused(tmp_path, calls):
    out = str(tmp_path / "run")
    run(parse("--out", out, "--limit", "1", "--parties", "2"))
    with pytest.raises(FedAttnError, match=r"differs in system\.split\)"):
        run(parse("--out", out, "--limit", "1", "--parties", "2", "--split", "SemEx"))
    assert len(calls) == 1


def test_an_impossible_split_is_refused_before_the_folder_is_claimed(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FedAttnError, match="1 exemplars cannot be dealt"):
        run(parse("--out", str(out), "--split", "SemEx", "--parties", "4"))
    assert not out.exists()
