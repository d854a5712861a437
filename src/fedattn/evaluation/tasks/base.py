"""What a task gives the evaluation harness: items every system can answer, and how to score an answer.

A task knows its data and its scoring, never a system: it does not say how many parties there
are or who holds what beyond the documents themselves, so the same items evaluate FedAttn,
SpecFed or any other system (``fedattn.systems.base``). FedAttn's ``--split``, ``--parties`` (for
a few-shot prompt) and ``--mode`` are FedAttn's ways of dealing an item out, not the task's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

DOCUMENT_SEPARATOR = "\n\n"  # between the documents and the question of a whole prompt


@dataclass(frozen=True)
class Item:
    """One question as every system sees it.

    ``documents[k]`` is the private text of holder k (a collaborator), in order; the one who asks
    holds only the question. ``exemplars`` are public few-shot examples: an item with exemplars is
    a plain-text prompt for a base model (the exemplars joined by newlines, then the question, no
    chat template), which a system may deal out as it likes. ``fields`` are what the record shows
    of the item (its index, the gold answer, ...); ``references`` are what the scorer accepts.
    """

    key: str
    question: str
    documents: tuple[str, ...] = ()
    exemplars: tuple[str, ...] = ()
    stop_texts: tuple[str, ...] = ()  # the answer ends before any of these (the next few-shot item)
    references: tuple[str, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # the question alone, without the task's framing (a multiple-choice item's choices and answer
    # format): what a helper is asked for background on (FedRefine's text-to-text hint); "" = ``question``
    bare_question: str = ""

    def whole_prompt(self) -> tuple[str, bool]:
        """The item as one party's prompt (for a system where one party holds it all: SpecFed's
        server, FedSEA's client), and whether it is a chat message: a few-shot item's raw text
        (exemplars joined by newlines, then the question; no template), else the documents and the
        question as one chat message."""
        if self.exemplars:
            return "\n".join(self.exemplars) + self.question, False
        return DOCUMENT_SEPARATOR.join([*self.documents, self.question]), True


@dataclass
class TaskRun:
    """A task with its options applied (data read, sizes checked): what the harness evaluates."""

    name: str  # the summary's task, e.g. "gsm8k" or "narrativeqa": results of one name are comparable
    title: str  # for people: "GSM8K 4-shot"
    config: dict  # everything that decides the items and their scores (part of the folder's configuration)
    settings: dict[str, Any]  # the comparable settings among ``config``, named like the options (shots, parties)
    items: list[Item]  # the selected items, in order
    score: Callable[[Item, str], dict[str, Any]]  # an answer's scores (numbers are averaged) and other findings
    main_metric: str  # the score that is the task's quality (a key of ``score``'s result)
    unit: str = "items"  # what an item is called in messages: "problems"
    extra_metrics: Callable[[list[dict]], dict[str, Any]] = lambda records: {}  # e.g. EM per question kind


class Task(Protocol):
    """A benchmark for ``fedattn eval NAME``."""

    name: str
    description: str  # the command's help
    documents: bool  # items carry private documents (else a public prompt for the system to deal)
    max_new_tokens: int  # the default answer length
    batch_size: int  # the default number of items answered together

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        """The task's own options (item selection, data)."""

    def prepare(self, args: argparse.Namespace) -> TaskRun:
        """Read the data and select the items; refuse bad sizes before any model is loaded."""


def add_range_options(parser: argparse.ArgumentParser, unit: str) -> None:
    """``--limit M`` and ``--offset K``: which of a fixed list of ``unit`` ("test problem") a run evaluates."""
    from fedattn.argtypes import non_negative_int, positive_int

    parser.add_argument(
        "--limit", type=positive_int, metavar="M", help=f"evaluate M {unit}s (default: all from --offset)"
    )
    parser.add_argument("--offset", type=non_negative_int, default=0, help=f"first {unit} (default 0)")


def item_range(args: argparse.Namespace, count: int, items: str) -> range:
    """The indices ``--offset`` and ``--limit`` select of ``count`` (``items``: "GSM8K test problems")."""
    from fedattn.errors import FedAttnError

    if args.offset >= count:
        raise FedAttnError(f"--offset {args.offset} is past the last of the {count} {items}")
    return range(args.offset, count if args.limit is None else min(count, args.offset + args.limit))
