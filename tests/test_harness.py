"""The harness against a second system that knows nothing of FedAttn (tests/fake_system.py): the
contract is all it takes to evaluate a task, resume, and get the one summary shape."""

import argparse
import json

import fake_system
import pytest

from fedattn.cli.main import main, parse_words
from fedattn.errors import FedAttnError
from fedattn.evaluation import eval_crossfacts, eval_gsm8k, harness
from fedattn.evaluation.results import RecordList
from fedattn.evaluation.tasks import gsm8k
from fedattn.report.schema import RunReport
from fedattn.systems import SYSTEMS, get_system


@pytest.fixture
def echo(monkeypatch):
    """The echo system in the registry, with a fresh record of the batches it answered."""
    monkeypatch.setitem(SYSTEMS, "echo", "fake_system")
    monkeypatch.setattr(fake_system.SYSTEM, "batches", [])
    return fake_system.SYSTEM


def parse(task, system: str, *words: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser, task, system)
    return parser.parse_args(["--system", system, *words])


def records_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def test_another_system_is_evaluated_through_the_contract_and_resumes(echo, tmp_path, capsys):
    out = tmp_path / "echo"
    words = ("--shots", "2", "--limit", "5", "--oracle", "--batch-size", "2", "--out", str(out))
    assert harness.evaluate(eval_gsm8k.TASK, parse(eval_gsm8k.TASK, "echo", *words)) == 0
    assert echo.batches == [["0", "1"], ["2", "3"], ["4"]]
    records = records_of(out)
    golds = [problem.answer for problem in gsm8k.load("test")[:5]]
    assert [record["gold"] for record in records] == golds and all(record["scores"]["em"] for record in records)
    assert [record["batch_size"] for record in records] == [2, 2, 2, 2, 1]
    assert RunReport.from_json(records[0]["report"]).system == "echo"
    summary = json.loads((out / "summary.json").read_text())
    questions = [gsm8k.few_shot_prompt(index, 2).question for index in range(5)]
    assert summary["bytes_per_query"] == pytest.approx(sum(len(q.encode()) for q in questions) / 5)
    assert (summary["system"], summary["task"], summary["metrics"]["em"], summary["setting"]) == (
        "echo",
        "gsm8k",
        1.0,
        "oracle",
    )
    assert summary["settings"] == {"shots": 2, "oracle": True} and summary["exposure"] is None
    assert summary["time_per_query_s"] == 0.5 and summary["time"]["tokens_per_s"] == pytest.approx(2 / 0.25)
    task = {
        "name": "gsm8k",
        "split": "test",
        "prompt": eval_gsm8k.PROMPT,
        "shots": 2,
        "stop_texts": ["\nQuestion:", "Question:"],
    }
    assert summary["config"] == {"task": task, "system": {"name": "echo", "oracle": True}}
    assert "GSM8K 2-shot, echo oracle: EM 100.0% over 5 problems" in capsys.readouterr().out

    assert (
        harness.evaluate(
            eval_gsm8k.TASK, parse(eval_gsm8k.TASK, "echo", *words[:-4], "--limit", "6", "--out", str(out))
        )
        == 0
    )
    assert echo.batches[3:] == [["5"]]  # only the new problem
    assert records_of(out)[:5] == records
    with pytest.raises(FedAttnError, match=r"differs in system\.oracle\)"):
        harness.evaluate(eval_gsm8k.TASK, parse(eval_gsm8k.TASK, "echo", "--shots", "2", "--out", str(out)))


def test_private_documents_reach_the_system_with_their_holders(echo, tmp_path):
    out = tmp_path / "cf"
    words = ("--count", "3", "--parties", "4", "--facts", "2", "--out", str(out), "--json")
    assert harness.evaluate(eval_crossfacts.TASK, parse(eval_crossfacts.TASK, "echo", *words)) == 0
    for record in records_of(out):
        report = RunReport.from_json(record["report"])
        assert [party.name for party in report.parties] == ["holder-0", "holder-1", "holder-2", "asker"]
        assert record["answer"] == record["question"].split()[0] and record["scores"] == {"em": 0, "f1": 0.0}


def test_the_loop_skips_what_the_store_holds_and_batches_the_rest():
    store = RecordList()
    store.append({"key": "2"})
    batches = []

    def work(batch):
        batches.append(batch)
        return [{"key": str(unit)} for unit in batch]

    todo = harness.pending(store, list(range(6)), str)
    harness.run_batches(store, todo, work, 2, "units", 6, quiet=True)
    assert batches == [[0, 1], [3, 4], [5]]
    assert [record["key"] for record in store.records()] == ["2", "0", "1", "3", "4", "5"]


def test_an_unknown_system_is_one_line():
    with pytest.raises(FedAttnError, match="unknown system 'nope'; choose one of fedattn"):
        get_system("nope")


def test_eval_system_picks_the_options_its_parser_holds(echo, tmp_path, capsys):
    """``fedattn eval TASK --system NAME`` parses NAME's own options and runs NAME; FedAttn's are
    then unknown words, and with no --system they are the options again (and echo's are not)."""
    out = tmp_path / "echo"
    words = ["eval", "gsm8k", "--shots", "1", "--limit", "3", "--oracle", "--out", str(out), "--json"]
    assert main([*words[:2], "--system", "echo", *words[2:]]) == 0
    assert echo.batches == [["0", "1", "2"]]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["system"], summary["items"], summary["metrics"]["em"]) == ("echo", 3, 1.0)
    capsys.readouterr()

    assert parse_words(["eval", "crossfacts", "--system=echo", "--oracle", "--out", str(out)]).oracle is True
    assert parse_words(["eval", "crossfacts", "--sys", "echo", "--oracle", "--out", str(out)]).oracle is True
    assert main(["eval", "gsm8k", "--system", "echo", "--model", "tiny-random", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "fedattn: error: unrecognized arguments: --model tiny-random"

    default = parse_words(["eval", "gsm8k", "--model", "tiny-random", "--sync-every", "2", "--out", str(out)])
    assert (default.system, default.model, default.sync_every) == ("fedattn", "tiny-random", 2)
    assert main(["eval", "gsm8k", "--oracle", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "fedattn: error: unrecognized arguments: --oracle"
    assert main(["eval", "gsm8k", "--system", "nope", "--out", str(out)]) == 2
    refusal = "fedattn: error: unknown system 'nope'; choose one of fedattn, specfed, split, refine, echo"
    assert capsys.readouterr().err.strip() == refusal


def test_eval_help_shows_the_default_system_and_how_to_change_it(echo, capsys):
    with pytest.raises(SystemExit) as done:
        main(["eval", "gsm8k", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "--model MODEL" in shown and "--oracle" not in shown
    assert "the system options here are fedattn's, and --system NAME gives NAME's instead" in shown
    with pytest.raises(SystemExit):
        main(["eval", "gsm8k", "--system", "echo", "--help"])
    shown = capsys.readouterr().out
    assert "--oracle" in shown and "--model" not in shown
