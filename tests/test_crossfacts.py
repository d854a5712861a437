"""CrossFacts: the generator's guarantees (no model), the scorer, and the evaluation end to end with tiny-random."""

import argparse
import json

import pytest

from fedattn.errors import FedAttnError
from fedattn.evaluation import eval_crossfacts
from fedattn.evaluation.eval_crossfacts import exact_match, f1_score, task_item
from fedattn.evaluation.tasks.crossfacts import generate, generate_item, holders, similar
from fedattn.report.schema import RunReport
from fedattn.systems.fedattn.system import VIEWS


def test_deterministic_for_a_seed():
    assert generate(7, 20) == generate(7, 20)
    assert generate(7, 20) != generate(8, 20)
    assert generate(7, 5) == generate(7, 20)[:5]  # item i does not depend on the count


@pytest.mark.parametrize("parties, facts", [(2, 2), (3, 4), (5, 3)])
def test_answer_in_exactly_one_party_document_which_is_the_recorded_holder(parties, facts):
    for item in generate(1, 50, parties, facts):
        assert holders(item) == [item.holder]
        assert sum(document.count(item.answer) for document in item.documents) == 1
        assert item.answer not in item.question
        assert item.person in item.documents[item.holder]
        assert item.question.endswith("only.") or "only, as" in item.question


def test_sizes_and_parties_are_configurable():
    for parties, facts in [(2, 2), (4, 3), (6, 1)]:
        for item in generate(3, 5, parties, facts):
            assert len(item.documents) == parties - 1
            assert all(len(document.splitlines()) == facts + 1 for document in item.documents)  # header + people
    with pytest.raises(FedAttnError):
        generate(0, 1, parties=1)
    with pytest.raises(FedAttnError):
        generate(0, 1, parties=2, facts_per_party=1)  # no room for a distractor


def test_a_similar_name_with_other_facts_is_present():
    items = generate(2, 50)
    for item in items:
        assert item.distractors and all(similar(name, item.person) for name in item.distractors)
        everything = "\n".join(item.documents)
        for name in item.distractors:
            assert f"- {name}:" in everything
    holder_parties = {item.holder_party for item in items}
    assert holder_parties == {1, 2}  # the answer is not always with the same party


def test_views_hold_the_same_text_in_each_mode():
    generated = generate(4, 1)[0]
    item = task_item(0, generated)  # what the harness hands a system
    assert (item.documents, item.question, item.references) == (
        generated.documents,
        generated.question,
        generated.golds,
    )
    federated, centralized, alone = (VIEWS[mode](item) for mode in ("federated", "centralized", "alone"))
    assert federated.contexts == item.documents and federated.publisher_context is None
    assert centralized.contexts == () and centralized.publisher_context == "\n\n".join(item.documents)
    assert alone.contexts == () and alone.publisher_context is None
    assert federated.question == centralized.question == alone.question == item.question


def test_scoring():
    assert exact_match("The code is QT3840.\nMore text", "QT3840")
    assert exact_match("\n2020-03-01", "2020-03-01")
    assert exact_match("qt 3840", "QT3840") is False  # one token against two
    assert not exact_match("QT38400", "QT3840")
    assert not exact_match("something\nQT3840", "QT3840")  # only the first line counts
    assert f1_score("Gdansk", "Gdansk") == 1.0
    assert f1_score("the city Gdansk", "Gdansk") == pytest.approx(0.5)
    assert f1_score("", "Gdansk") == 0.0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_crossfacts.add_arguments(parser)
    return parser.parse_args(argv)


def run_mode(tmp_path, capsys, mode: str, *extra: str) -> tuple[list[dict], dict]:
    out = tmp_path / mode
    argv = [
        "--model",
        "tiny-random",
        "--count",
        "3",
        "--facts",
        "2",
        "--max-new-tokens",
        "2",
        "--mode",
        mode,
        "--out",
        str(out),
        "--json",
        *extra,
    ]
    assert eval_crossfacts.run(parse(argv)) == 0
    printed = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert json.loads((out / "summary.json").read_text())["items"] == printed["items"]
    return records, printed


def segment_tokens(record: dict) -> list[int]:
    return [party["tokens"] for party in record["report"]["parties"]]


@pytest.mark.parametrize("mode", ["federated", "centralized", "alone"])
def test_end_to_end_writes_records_and_summary(tmp_path, capsys, one_torch_thread, mode):
    records, summary = run_mode(tmp_path, capsys, mode, "--batch-size", "2")  # a batch of 2, then 1
    assert [record["key"] for record in records] == ["0", "1", "2"]
    assert summary["items"] == 3 and 0.0 <= summary["metrics"]["em"] <= 1.0
    assert summary["config"]["system"]["mode"] == mode and summary["config"]["system"]["model"]["name"] == "tiny-random"
    assert summary["task"] == "crossfacts" and summary["reference"] == (mode != "federated")
    parties = 3 if mode == "federated" else 1
    for index, record in enumerate(records):
        item = generate_item(0, index, 3, 2)
        assert (record["gold"], record["field"], record["question"]) == (item.answer, item.field, item.question)
        answer = record["answer"]
        assert record["scores"] == {"em": int(exact_match(answer, item.answer)), "f1": f1_score(answer, item.answer)}
        assert answer == RunReport.from_json(record["report"]).party("publisher").answer
        report = RunReport.from_json(record["report"])
        assert len(segment_tokens(record)) == parties
        assert report.measured_bytes["sent"] == report.expected_bytes["sent"]
        assert report.measured_bytes["received"] == report.expected_bytes["received"]
        assert (report.measured_bytes["sent"] > 0) == (mode == "federated")
    assert summary["metrics"]["em"] == sum(record["scores"]["em"] for record in records) / 3
    fields = {record["field"] for record in records}
    assert set(summary["metrics"]["em_by_field"]) == fields
    assert (summary["exposure"] is None) == (mode != "federated")


def test_the_same_text_reaches_the_model_federated_and_centralized(tmp_path, capsys, one_torch_thread):
    federated, _ = run_mode(tmp_path, capsys, "federated")
    centralized, _ = run_mode(tmp_path, capsys, "centralized")
    for a, b in zip(federated, centralized):
        assert sum(segment_tokens(a)) == sum(segment_tokens(b))  # byte-level tokens: same text


def test_resume_skips_finished_items(tmp_path, capsys, one_torch_thread):
    first, _ = run_mode(tmp_path, capsys, "federated", "--limit", "2")
    assert [record["key"] for record in first] == ["0", "1"]
    records, summary = run_mode(tmp_path, capsys, "federated")
    assert [record["key"] for record in records] == ["0", "1", "2"]
    assert records[:2] == first  # untouched, not recomputed
    assert summary["items"] == 3
    with pytest.raises(FedAttnError, match=r"differs in task\.data_seed\)"):
        run_mode(tmp_path, capsys, "federated", "--data-seed", "1")
