"""``fedattn participant``: ONE party of a networked run in this process (deployments, torchrun,
and each child of ``fedattn run --transport torch|grpc``).

A party meets the others either at a rendezvous over gloo (--rank, --world-size, --master) or in a
federation over gRPC with mutual TLS (--roster, --name, --parties): ``cli.meeting``, which any
system's party command shares. Under torchrun every rank gets the same words, so the rank, world
size and store may come from the environment, and both --context and --question may be given: the
role picks one, and '{rank}' in an @FILE path is this rank's number (e.g. --context @party-{rank}.txt).
"""

from __future__ import annotations

import argparse
import json

from fedattn.argtypes import add_prompt_options, output_file, read_text
from fedattn.cli.meeting import add_meeting_options, meeting_from_args, report_path
from fedattn.cli.run import print_report
from fedattn.systems.fedattn.config import add_options, configure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_meeting_options(parser)
    add_prompt_options(parser, question_required=False, one_party=True)
    parser.add_argument(
        "--report", type=output_file, help="also write this party's JSON report here ('{rank}' is replaced by the rank)"
    )
    add_options(parser)


def run(args: argparse.Namespace) -> int:
    from fedattn.network.meeting import exit_now
    from fedattn.systems.fedattn.networked import own_segment, run_party

    meeting = meeting_from_args(args)
    report_to = report_path(args.report, meeting.rank)
    text, question, publisher_context = _own_inputs(args, meeting.rank, meeting.world_size)
    loaded, config, _ = configure(args)
    segment = own_segment(loaded, meeting, text, question, publisher_context, args.raw)
    report = run_party(loaded, meeting, segment, config)
    if report_to is not None:
        report_to.write_text(json.dumps(report.to_json(), indent=2))
    print_report(report, args.json)
    exit_now(0)
    return 0


def _own_inputs(args: argparse.Namespace, rank: int, world_size: int) -> tuple[str | None, str | None, str | None]:
    """Read only this rank's own input (see the module's docstring)."""

    def read(value: str | None) -> str | None:
        return (
            None if value is None else read_text(value.replace("{rank}", str(rank)) if value.startswith("@") else value)
        )

    if args.context is not None and args.question is not None:  # the same words for every rank
        if rank == world_size - 1:
            return None, read(args.question), read(args.publisher_context)
        return read(args.context), None, None
    return read(args.context), read(args.question), read(args.publisher_context)
