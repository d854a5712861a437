"""``fedattn eval gsm8k``: exact match on GSM8K test problems.

As in the paper: a raw base-model prompt (no chat template, whatever --raw says) made of the
first K train problems as fixed chain-of-thought exemplars, then the test question
(``tasks.gsm8k.few_shot_prompt``); the system decides who holds what (FedAttn: ``--split`` among
``--parties``). An answer ends at EOS or at the model's next "Question:", and is scored by the
paper's EM; with several answering parties (FedAttn's ``--every-answer``) each is scored.

Every finished problem is one record in ``--out`` (see ``fedattn.evaluation.harness``), so an
interrupted run resumes where it stopped; the summary covers every record there. A folder holding
results of another configuration (model, split, N, shots, schedule, sparsity, decoding...) is refused.
"""

from __future__ import annotations

import argparse

from fedattn.evaluation import harness
from fedattn.evaluation.tasks import gsm8k
from fedattn.evaluation.tasks.base import Item, TaskRun, add_range_options, item_range
from fedattn.evaluation.tasks.gsm8k_scoring import extract_answer, is_correct
from fedattn.systems import DEFAULT_SYSTEM

STOP_TEXTS = ("\nQuestion:", "Question:")  # the model starting the next few-shot item
PAPER_MAX_NEW_TOKENS = 256
PROMPT = "raw few-shot chain of thought, first K train problems"


class GSM8K:
    name = "gsm8k"
    description = "few-shot GSM8K with the prompt split among the parties (the paper's setting)"
    documents = False
    max_new_tokens = PAPER_MAX_NEW_TOKENS
    batch_size = 8

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        from fedattn.argtypes import non_negative_int

        parser.add_argument(
            "--shots",
            type=non_negative_int,
            default=4,
            metavar="K",
            help="exemplars: the first K GSM8K train problems (default 4)",
        )
        add_range_options(parser, "test problem")

    def prepare(self, args: argparse.Namespace) -> TaskRun:
        selected = item_range(args, len(gsm8k.load("test")), "GSM8K test problems")
        return TaskRun(
            name="gsm8k",
            title=f"GSM8K {args.shots}-shot",
            config={"split": "test", "prompt": PROMPT, "shots": args.shots, "stop_texts": list(STOP_TEXTS)},
            settings={"shots": args.shots},
            items=[problem_item(index, args.shots) for index in selected],
            score=score,
            main_metric="em",
            unit="problems",
        )


def problem_item(index: int, shots: int) -> Item:
    prompt = gsm8k.few_shot_prompt(index, shots)
    gold = gsm8k.load("test")[index].answer
    return Item(
        key=str(index),
        question=prompt.question,
        exemplars=prompt.exemplars,
        stop_texts=STOP_TEXTS,
        references=(gold,),
        fields={"index": index, "gold": gold},
    )


def score(item: Item, answer: str) -> dict:
    """The paper's EM, and the number it read from the answer."""
    return {"em": is_correct(answer, item.references[0]), "extracted": extract_answer(answer)}


TASK = GSM8K()


def add_arguments(parser: argparse.ArgumentParser, system: str = DEFAULT_SYSTEM) -> None:
    """The options of ``fedattn eval gsm8k --system SYSTEM``."""
    harness.add_arguments(parser, TASK, system)


def run(args: argparse.Namespace) -> int:
    return harness.evaluate(TASK, args)
