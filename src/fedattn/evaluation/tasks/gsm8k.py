"""GSM8K few-shot chain-of-thought prompts in the paper's format (the splits are in splits.py).

Exemplars: "Question: ...\\nLet's think step by step\\n<solution>\\nThe answer is N"; the test
question is appended as "\\nQuestion: <q>\\nLet's think step by step\\n".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from fedattn.errors import FedAttnError

DATA_DIR = Path(__file__).resolve().parent / "data" / "gsm8k"  # package data: inside the wheel
_CALCULATOR = re.compile(r"<<[^>]*>>")


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the worked solution without the final "#### N" line
    answer: str  # the gold number


def load(split: str, data_dir: Path = DATA_DIR) -> list[Problem]:
    path = data_dir / f"{split}.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise FedAttnError(f"cannot read GSM8K {split} set at {path}: {error.strerror}") from None
    return [_problem(json.loads(line)) for line in lines if line.strip()]


def _problem(record: dict) -> Problem:
    solution, _, answer = record["answer"].rpartition("####")
    return Problem(record["question"].strip(), _CALCULATOR.sub("", solution).strip(), answer.strip().replace(",", ""))


def exemplar_text(problem: Problem) -> str:
    return f"Question: {problem.question}\nLet's think step by step\n{problem.solution}\nThe answer is {problem.answer}"


def question_text(problem: Problem) -> str:
    return f"\nQuestion: {problem.question}\nLet's think step by step\n"
