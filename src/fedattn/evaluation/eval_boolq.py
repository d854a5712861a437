"""``fedattn eval boolq``: accuracy on BoolQ dev questions, zero-shot (``tasks.boolq``).

Each item is a passage (a private document) and a yes/no question about it, so every system that
answers a prompt with documents can be evaluated on it: FedAttn deals it by ``--mode`` (federated:
a collaborator holds the passage, the publisher asks), SpecFed's server and FedSEA's client
(``--system split``) hold the whole chat prompt. The items are the file's questions from
``--offset``, ``--limit`` of them; the folder's configuration holds the data file's sha256, so a
folder of another file's results is refused.
"""

from __future__ import annotations

import argparse

from fedattn.evaluation import harness
from fedattn.evaluation.tasks import boolq
from fedattn.evaluation.tasks.base import Item, TaskRun, add_range_options, item_range
from fedattn.systems import DEFAULT_SYSTEM

DEFAULT_MAX_NEW_TOKENS = 8  # "Yes" or "No", with room for "The answer is ..."
PROMPT = "zero-shot chat: title and passage, then the question and 'Answer yes or no.'"
SCORING = "accuracy: the answer's first yes/no (true/false) as a whole word equals the gold answer"


class BoolQ:
    name = "boolq"
    description = "BoolQ dev: a yes/no question about a private passage, zero-shot, scored by accuracy"
    documents = True
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    batch_size = 8

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        add_range_options(parser, "question")

    def prepare(self, args: argparse.Namespace) -> TaskRun:
        dataset = boolq.load()
        selected = item_range(args, len(dataset.questions), "BoolQ questions")
        return TaskRun(
            name="boolq",
            title="BoolQ zero-shot",
            config={"split": "dev", "data_sha256": dataset.sha256, "prompt": PROMPT, "scoring": SCORING},
            settings={},
            items=[question_item(index, dataset.questions[index]) for index in selected],
            score=score,
            main_metric="accuracy",
            unit="questions",
        )


def question_item(index: int, question: boolq.Question) -> Item:
    gold = "yes" if question.answer else "no"
    return Item(
        key=str(index),
        question=boolq.asked(question),
        documents=(boolq.document(question),),
        references=(gold,),
        fields={"index": index, "title": question.title, "question": question.question, "gold": gold},
    )


def score(item: Item, answer: str) -> dict:
    """Accuracy, whether the answer said yes or no at all, and what it said."""
    said = boolq.verdict(answer)
    parsed = None if said is None else ("yes" if said else "no")
    return {"accuracy": parsed == item.references[0], "answered": parsed is not None, "parsed": parsed}


TASK = BoolQ()


def add_arguments(parser: argparse.ArgumentParser, system: str = DEFAULT_SYSTEM) -> None:
    """The options of ``fedattn eval boolq --system SYSTEM``."""
    harness.add_arguments(parser, TASK, system)


def run(args: argparse.Namespace) -> int:
    return harness.evaluate(TASK, args)
