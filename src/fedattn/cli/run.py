"""``fedattn run``: one question answered by N parties, in this process or one process each."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager

from fedattn.argtypes import add_prompt_options, option_words
from fedattn.report.schema import RunReport
from fedattn.systems.fedattn.config import SHARED_OPTIONS, add_options, check_options, configure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_options(parser, question_required=True)
    parser.add_argument(
        "--transport",
        choices=["inprocess", "torch", "grpc"],
        default="inprocess",
        help="inprocess (default); or one local process per party, over torch.distributed (gloo: torch) "
        "or gRPC with mutual TLS and a throwaway CA (grpc)",
    )
    add_options(parser)


def run(args: argparse.Namespace) -> int:
    from fedattn.runtime.prompting import party_pieces

    party_pieces(args.context, args.question, args.publisher_context, None)  # empty texts: refused before any load
    if args.transport != "inprocess":
        check_options(args)  # once here, rather than once in every party's process
        return _networked(args)
    return _in_process(args)


def _in_process(args: argparse.Namespace) -> int:
    from fedattn.systems.fedattn.query import answer_question

    loaded, config, device = configure(args)
    with _busy(f"{len(args.context) + 1} parties: prefill and decode on {device}", quiet=args.json):
        report = answer_question(
            loaded.model,
            loaded.tokenizer,
            args.context,
            args.question,
            config,
            args.publisher_context,
            args.raw,
            {"name": loaded.name, "identity": loaded.identity},
        )
    print_report(report, args.json)
    return 0


def _networked(args: argparse.Namespace) -> int:
    """One local process per party (the launcher), their reports merged into one."""
    from fedattn.network.launcher import launch_local
    from fedattn.report.schema import merge
    from fedattn.systems.fedattn.networked import rank_inputs
    from fedattn.systems.fedattn.party import party_names

    inputs = rank_inputs(args.context, args.question, args.publisher_context)
    names = party_names(len(inputs))
    documents = launch_local(names, ["participant", *shared_words(args)], inputs, args.timeout, args.transport)
    print_report(merge([RunReport.from_json(document) for document in documents]), args.json)
    return 0


def print_report(report: RunReport, as_json: bool) -> None:
    """``--json``: the report's document; else the answer and the traffic table."""
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        from fedattn.report.render import print_report as render

        render(report)


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
