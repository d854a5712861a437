"""``fedattn eval mc --task arc-challenge|openbookqa|mmlu``: multiple-choice accuracy, zero-shot, as C2C evaluates.

Each item is one question as one chat message: Cache-to-Cache's zero-shot prompt (the question,
its choices as "A. text" lines, an instruction to answer "The correct answer is X", the message
itself ending "The correct answer is"; ``tasks.multiple_choice.prompt``), answered greedily in up
to 64 new tokens by default (C2C's setting) and scored by the label the answer names
(``multiple_choice.score``). The items are the evaluation set's questions from ``--offset``,
``--limit`` of them. These sets are never trained on (``fedattn refine train`` refuses them). The
folder's configuration holds a sha256 of the set's questions, so a folder of other questions'
results is refused.

The item also carries the question alone (``Item.bare_question``): C2C's text-to-text baseline asks
its helper for background on the question without its choices.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from functools import partial

from fedattn.evaluation import harness
from fedattn.evaluation.tasks import multiple_choice
from fedattn.evaluation.tasks.base import Item, TaskRun, add_range_options, item_range
from fedattn.systems import DEFAULT_SYSTEM

DEFAULT_MAX_NEW_TOKENS = 64  # C2C's evaluation
PROMPT = "C2C zero-shot chat: the question, its choices as 'A. text' lines, 'The correct answer is X' instructions"
SCORING = "accuracy: the label the answer names (its first 'answer is X', else a leading letter) is the gold label"


class MultipleChoice:
    name = "mc"
    description = "multiple choice (ARC-Challenge, OpenBookQA, MMLU test), zero-shot as C2C, scored by accuracy"
    documents = False
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    batch_size = 4

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--task", required=True, choices=tuple(multiple_choice.EVALUATION_SETS), help="the evaluation set"
        )
        add_range_options(parser, "question")

    def prepare(self, args: argparse.Namespace) -> TaskRun:
        questions = multiple_choice.evaluation_set(args.task)
        selected = item_range(args, len(questions), f"{args.task} questions")
        return TaskRun(
            name=args.task,
            title=f"{args.task} zero-shot",
            config={
                "set": args.task,
                "questions_sha256": questions_sha256(questions),
                "prompt": PROMPT,
                "scoring": SCORING,
            },
            settings={},
            items=[question_item(index, questions[index]) for index in selected],
            score=partial(score, questions),
            main_metric="accuracy",
            unit="questions",
        )


def questions_sha256(questions: tuple[multiple_choice.Question, ...]) -> str:
    """The questions' content (ids, texts, choices, gold), whatever file they were read from."""
    rows = [[q.id, q.text, list(q.labels), list(q.choices), q.gold] for q in questions]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def question_item(index: int, question: multiple_choice.Question) -> Item:
    return Item(
        key=str(index),
        question=multiple_choice.prompt(question),
        references=(question.gold,),
        fields={"index": index, "id": question.id, "gold": question.gold},
        bare_question=question.text,
    )


def score(questions: tuple[multiple_choice.Question, ...], item: Item, answer: str) -> dict:
    """The task's score of the item's question (accuracy, the label named), and whether it named one."""
    scores = multiple_choice.score(questions[item.fields["index"]], answer)
    return {**scores, "answered": scores["answer"] is not None}


TASK = MultipleChoice()


def add_arguments(parser: argparse.ArgumentParser, system: str = DEFAULT_SYSTEM) -> None:
    """The options of ``fedattn eval mc --system SYSTEM``."""
    harness.add_arguments(parser, TASK, system)


def run(args: argparse.Namespace) -> int:
    return harness.evaluate(TASK, args)
