"""GSM8K few-shot chain-of-thought prompts in the paper's format (FedAttn's splits are in splits.py).

Exemplars: "Question: ...\\nLet's think step by step\\n<solution>\\nThe answer is N"; the test
question is appended as "\\nQuestion: <q>\\nLet's think step by step\\n". ``few_shot_prompt`` is
the one place the prompt of a test problem is assembled (the evaluation, drift and the benches).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedattn.errors import FedAttnError

DATA_DIR = Path(__file__).resolve().parent / "data" / "gsm8k"  # package data: inside the wheel
_CALCULATOR = re.compile(r"<<[^>]*>>")
SEPARATOR = "\n"  # between exemplars; the question text starts with its own newline


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the worked solution without the final "#### N" line
    answer: str  # the gold number


@lru_cache(maxsize=4)
def load(split: str, data_dir: Path = DATA_DIR) -> tuple[Problem, ...]:
    """The problems of ``split`` (read once per process: the prompt of every problem needs the train set)."""
    path = data_dir / f"{split}.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise FedAttnError(f"cannot read GSM8K {split} set at {path}: {error.strerror}") from None
    return tuple(_problem(json.loads(line)) for line in lines if line.strip())


def _problem(record: dict) -> Problem:
    solution, _, answer = record["answer"].rpartition("####")
    return Problem(record["question"].strip(), _CALCULATOR.sub("", solution).strip(), answer.strip().replace(",", ""))


def exemplar_text(problem: Problem) -> str:
    return f"Question: {problem.question}\nLet's think step by step\n{problem.solution}\nThe answer is {problem.answer}"


def question_text(problem: Problem) -> str:
    return f"\nQuestion: {problem.question}\nLet's think step by step\n"


@dataclass(frozen=True)
class FewShotPrompt:
    """The paper's prompt of one test problem: exemplars, then the question (``text`` joins them)."""

    exemplars: tuple[str, ...]
    question: str

    @property
    def text(self) -> str:
        return SEPARATOR.join(self.exemplars) + self.question


def few_shot_prompt(index: int, shots: int) -> FewShotPrompt:
    """Test problem ``index`` behind the first ``shots`` train problems as exemplars."""
    test, train = load("test"), load("train")
    if not 0 <= index < len(test):
        raise FedAttnError(f"GSM8K test problem {index} does not exist: there are {len(test)} (0..{len(test) - 1})")
    if shots > len(train):
        raise FedAttnError(f"{shots} shots exceed the {len(train)} GSM8K train problems")
    return FewShotPrompt(tuple(exemplar_text(problem) for problem in train[:shots]), question_text(test[index]))
