"""``fedattn run``: one question answered by N parties, in this process or one process each."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager

from fedattn.argtypes import add_prompt_options, option_words
from fedattn.systems.fedattn.config import SHARED_OPTIONS, add_options, check_options, configure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_options(parser, question_required=True)
    parser.add_argument(
        "--transport",
        choices=["inprocess", "torch"],
        default="inprocess",
        help="inprocess (default), or torch: one local process per party over torch.distributed (gloo)",
    )
    add_options(parser)


def run(args: argparse.Namespace) -> int:
    from fedattn.runtime.prompting import party_pieces

    party_pieces(args.context, args.question, args.publisher_context, None)  # empty texts: refused before any load
    if args.transport == "torch":
        from fedattn.network.launcher import launch_local

        check_options(args)  # once here, rather than once in every party's process
        return launch_local(args, args.context, args.question, args.publisher_context, shared_words(args))
    return _in_process(args)


def _in_process(args: argparse.Namespace) -> int:
    from fedattn.systems.fedattn.query import answer_question

    loaded, config, device = configure(args)
    with _busy(f"{len(args.context) + 1} parties: prefill and decode on {device}", quiet=args.json):
        report = answer_question(
            loaded.model, loaded.tokenizer, args.context, args.question, config, args.publisher_context, args.raw
        )
    if args.json:
        document = report.to_json()
        document["model"] = {"name": loaded.name, "identity": loaded.identity}
        print(json.dumps(document, indent=2))
    else:
        from fedattn.report.render import print_report

        print_report(report, loaded.name)
    return 0


def shared_words(args: argparse.Namespace) -> list[str]:
    """The options every party must agree on, as words for the launcher's child processes."""
    return option_words({name: getattr(args, name) for name in SHARED_OPTIONS})


@contextmanager
def _busy(message: str, quiet: bool) -> Iterator[None]:
    """A spinner with elapsed time on stderr while a query runs (seconds to minutes on a CPU)."""
    if quiet:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield
