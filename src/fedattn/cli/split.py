"""``fedattn split``: one client's prompt answered by split inference (FedSEA-LLaMA) with a local
server, in this process or one process per party; ``fedattn split-party``: one party of such a run.

Human output is the run's report (answer, bytes per party measured and predicted, times), then
what the client itself holds and computes, and the bytes per generated token each way.
"""

from __future__ import annotations

import argparse
import json

from fedattn.argtypes import add_model_options, option_words, text_or_file
from fedattn.cli.meeting import (
    add_prompt_party_options,
    add_prompt_run_options,
    leave_with_report,
    meeting_from_args,
    report_path,
)
from fedattn.report.schema import RunReport
from fedattn.systems.fedsea import config as split_config

SHARED_OPTIONS = ("model", "dtype", "device", *split_config.RUN_OPTIONS)  # what both parties are given alike


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_run_options(parser, "client")
    add_model_options(parser)
    split_config.add_run_options(parser)


def add_party_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_party_options(parser, "the client's prompt (rank 1 only)")
    add_model_options(parser)
    split_config.add_run_options(parser)


def run(args: argparse.Namespace) -> int:
    from fedattn.systems.fedsea.query import check_prompt_text

    config = split_config.config_from_args(args)  # what the options alone rule out, before any load or launch
    check_prompt_text(args.prompt)
    if args.transport != "inprocess":
        return _networked(args)
    from fedattn.runtime.devices import resolve_device
    from fedattn.systems.fedsea.query import answer_chat, load_setup

    setup = load_setup(config, args.model, resolve_device(args.device), args.dtype, args.raw, progress=not args.json)
    config.check(setup.split.num_blocks, split_config.MAX_CLIENT_BLOCKS)  # as the local server would refuse it
    print_report(answer_chat(setup, args.prompt), args.json)
    return 0


def _networked(args: argparse.Namespace) -> int:
    """One local process per party (the launcher); their reports merged into one."""
    from fedattn.network.launcher import launch_local
    from fedattn.report.schema import merge
    from fedattn.systems.fedsea.inprocess import party_names

    words = option_words({name: getattr(args, name) for name in SHARED_OPTIONS}) + (["--raw"] if args.raw else [])
    private = [{}, {"--prompt": args.prompt}]  # the server (rank 0) gets no text
    documents = launch_local(party_names(1), ["split-party", *words], private, args.timeout, args.transport)
    print_report(merge([RunReport.from_json(document) for document in documents]), args.json)
    return 0


def run_party(args: argparse.Namespace) -> int:
    from fedattn.runtime.devices import resolve_device
    from fedattn.systems.fedsea.networked import run_party
    from fedattn.systems.fedsea.query import load_setup

    config = split_config.config_from_args(args)
    meeting = meeting_from_args(args)
    path = report_path(args.report, meeting.rank)
    prompt = None if args.prompt is None else text_or_file(args.prompt)
    setup = load_setup(config, args.model, resolve_device(args.device), args.dtype, args.raw, progress=False)
    leave_with_report(run_party(setup, meeting, prompt), path, print_report, args.json)
    return 0


def print_report(report: RunReport, as_json: bool) -> None:
    """``--json``: the report's document; else the report, then the client's share of the model and
    the bytes per generated token."""
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    from fedattn.report.render import format_bytes
    from fedattn.report.render import print_report as render

    render(report)
    details = report.details
    first, last = details["client_blocks"]
    share = details["client_share"]
    print(f"client: embeddings, blocks 0..{first - 1} and the last {last}, the head")
    print(
        f"client share: {share['compute']:.0%} of the compute per token, {share['memory']:.0%} of the weights, "
        f"{share['kv_cache']:.0%} of the KV cache"
    )
    per_token = details.get("bytes_per_token")
    if per_token is not None:
        print(f"per generated token: {format_bytes(per_token['up'])} up, {format_bytes(per_token['down'])} down")
