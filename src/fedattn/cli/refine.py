"""``fedattn refine``: a receiver's question answered with the caches of its sharers fused in
(FedRefine, Cache-to-Cache), in this process or one process per party; ``fedattn refine-party``:
one party of such a run.

``fedattn refine train`` (training a pair's projectors) is ``cli/refine_train.py``. Human output is
the run's report (answer, bytes per party measured and predicted, times), then each sharer as the receiver
saw it and, in the private mode, the rephrasing the sharers read.
"""

from __future__ import annotations

import argparse
import json

from fedattn.argtypes import add_placement_options, text_or_file
from fedattn.cli.meeting import (
    add_prompt_party_options,
    add_prompt_run_options,
    leave_with_report,
    meeting_from_args,
    report_path,
)
from fedattn.errors import FedAttnError
from fedattn.report.schema import RunReport
from fedattn.systems.fedrefine import config as refine_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_run_options(parser, "receiver")
    _add_models(parser)


def _add_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--receiver", required=True, metavar="NAME", help="the receiver model: it fuses and answers")
    refine_config.add_run_options(parser)
    add_placement_options(parser)


def add_party_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_party_options(parser, "the receiver's question (the last rank only)")
    _add_models(parser)


def run(args: argparse.Namespace) -> int:
    from fedattn.systems.fedsea.query import check_prompt_text

    config = refine_config.config_from_args(args)  # what the options alone rule out, before any load or launch
    check_prompt_text(args.prompt)
    if args.transport != "inprocess":
        if not config.sharers:
            raise FedAttnError("--transport runs the sharers as processes: give at least one --sharer")
        return _networked(args)
    from fedattn.runtime.devices import resolve_device
    from fedattn.systems.fedrefine.query import answer_chat, load_setup

    device = resolve_device(args.device)
    setup = load_setup(config, args.receiver, device, args.dtype, args.raw, progress=not args.json)
    print_report(answer_chat(setup, args.prompt), args.json)
    return 0


def _networked(args: argparse.Namespace) -> int:
    """One local process per party (the launcher); their reports merged into one."""
    from fedattn.argtypes import option_words
    from fedattn.network.launcher import launch_local
    from fedattn.report.schema import merge
    from fedattn.systems.fedrefine.networked import party_names

    words = ["--receiver", args.receiver, *refine_config.option_words_of(args)]
    words += option_words({"dtype": args.dtype, "device": args.device})
    names = party_names(len(args.sharer))
    private = [{} for _ in names[:-1]] + [{"--prompt": args.prompt}]  # the sharers get no text
    documents = launch_local(names, ["refine-party", *words], private, args.timeout, args.transport)
    print_report(merge([RunReport.from_json(document) for document in documents]), args.json)
    return 0


def run_party(args: argparse.Namespace) -> int:
    import torch

    from fedattn.runtime.devices import resolve_device
    from fedattn.runtime.models import load_model
    from fedattn.systems.fedrefine.networked import check_world, load_receiver, run_party

    config = refine_config.config_from_args(args)
    meeting = meeting_from_args(args)
    check_world(config, meeting)
    path = report_path(args.report, meeting.rank)
    question = None if args.prompt is None else text_or_file(args.prompt)
    device = resolve_device(args.device)
    if meeting.rank == len(config.sharers):
        party = load_receiver(config, args.receiver, device, args.dtype, args.raw)
    else:
        model = config.sharers[meeting.rank].model
        party = load_model(model, device=device, dtype=getattr(torch, args.dtype), progress=False)
    leave_with_report(run_party(config, party, meeting, question), path, print_report, args.json)
    return 0


def print_report(report: RunReport, as_json: bool) -> None:
    """``--json``: the report's document; else the report, then each sharer as the receiver saw it
    (its cache's bytes measured and predicted, tokens, blocks, time) and the rephrasing, if any."""
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    from fedattn.report.render import format_bytes
    from fedattn.report.render import print_report as render

    render(report)
    for entry in report.details.get("sharers", []):
        print(
            f"{entry['name']} ({entry['model']}): {entry['tokens']} tokens x {entry['blocks']} blocks, "
            f"{format_bytes(entry['bytes_from_sharer'])} back "
            f"(predicted {format_bytes(entry['expected_bytes_from_sharer'])}) "
            f"for {format_bytes(entry['bytes_to_sharer'])} asked; cache in {entry['cache_s']:.2f} s"
        )
    if report.details.get("rephrasing"):
        print(f"rephrasing (all the sharers read): {report.details['rephrasing']}")
