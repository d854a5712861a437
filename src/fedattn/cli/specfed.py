"""``fedattn specfed``: one prompt answered by an ensemble of workers with speculative drafts, in
this process or one process per party; ``fedattn specfed-party``: one party of such a run.

Human output is the run's report (answer, traffic per party, times) and then the rounds: their
number, the acceptance rate and tokens per round, and (in-process) the aggregation bias.
"""

from __future__ import annotations

import argparse
import json

from fedattn.argtypes import text_or_file
from fedattn.cli.meeting import (
    add_prompt_party_options,
    add_prompt_run_options,
    leave_with_report,
    meeting_from_args,
    report_path,
)
from fedattn.errors import FedAttnError
from fedattn.report.schema import RunReport
from fedattn.systems.specfed import config as specfed_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_run_options(parser, "server")
    specfed_config.add_model_options(parser)
    specfed_config.add_run_options(parser)


def add_party_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_party_options(parser, "the server's prompt (the last rank only)")
    specfed_config.add_model_options(parser)
    specfed_config.add_run_options(parser)


def run(args: argparse.Namespace) -> int:
    config = specfed_config.config_from_args(args)
    if args.transport != "inprocess":
        return _networked(args, config)
    from fedattn.runtime.devices import resolve_device
    from fedattn.systems.specfed.query import answer_chat, load_setup

    setup = load_setup(config, resolve_device(args.device), args.dtype, args.raw, progress=not args.json)
    print_report(answer_chat(setup, args.prompt), args.json)
    return 0


def _networked(args: argparse.Namespace, config: specfed_config.SpecFedConfig) -> int:
    """One local process per party (the launcher); their reports merged into one."""
    from fedattn.network.launcher import launch_local
    from fedattn.report.schema import merge
    from fedattn.systems.specfed.roles import party_names

    names = party_names(len(config.workers))
    private = [{} for _ in config.workers] + [{"--prompt": args.prompt}]
    documents = launch_local(names, ["specfed-party", *party_words(args)], private, args.timeout, args.transport)
    print_report(merge([RunReport.from_json(document) for document in documents]), args.json)
    return 0


def party_words(args: argparse.Namespace) -> list[str]:
    """The options every party must be given alike, as words for the launcher's children."""
    names = [name for name in specfed_config.SHARED_OPTIONS if name != "workers"]
    words = specfed_config.option_words_of(args, names)
    for worker in args.workers:
        words += ["--worker", f"{worker.model}:{worker.weight!r}"]
    return words


def run_party(args: argparse.Namespace) -> int:
    from fedattn.runtime.devices import resolve_device
    from fedattn.systems.specfed.networked import own_models, run_party
    from fedattn.systems.specfed.query import load_setup

    config = specfed_config.config_from_args(args)
    meeting = meeting_from_args(args)
    path = report_path(args.report, meeting.rank)
    if meeting.rank >= len(config.workers) + 1:
        raise FedAttnError(f"rank {meeting.rank} is beyond the run's {len(config.workers) + 1} parties")
    prompt = None if args.prompt is None else text_or_file(args.prompt)
    setup = load_setup(
        config,
        resolve_device(args.device),
        args.dtype,
        args.raw,
        progress=False,
        names=own_models(config, meeting.rank),
    )
    leave_with_report(run_party(setup, meeting, prompt), path, print_report, args.json)
    return 0


def print_report(report: RunReport, as_json: bool) -> None:
    """``--json``: the report's document; else the report, then the rounds in one line."""
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    from fedattn.report.render import print_report as render

    render(report)
    details = report.details
    rate = details.get("acceptance_rate")
    figures = [
        f"{details['rounds']} rounds",
        f"{details['tokens_per_round']:.2f} tokens per round",
        "no drafts" if rate is None else f"acceptance rate {rate:.2f}",
    ]
    if details.get("aggregation_bias") is not None:
        figures.append(f"aggregation bias {details['aggregation_bias']:.4f} (L1, mean over positions)")
    print(" · ".join(figures))
