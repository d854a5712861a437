"""How a party command (``fedattn participant``, and any system's) is told to meet the others:
at a rendezvous over gloo (--rank, --world-size, --master) or in a federation over gRPC with
mutual TLS (--roster, --name, --parties); the two sets exclude each other. Under torchrun every
rank gets the same words, so the rank, world size and store may come from the environment.

The command's own options must include ``--timeout`` (seconds without progress before giving up),
which every wait of the meeting keeps. In every system the last party starts the query.

A system whose query is one party's prompt (SpecFed, FedSEA) declares its command's and its party
command's common options with ``add_prompt_run_options`` and ``add_prompt_party_options``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fedattn.argtypes import host_port, name_list, non_negative_int, output_file, positive_int, text_or_file
from fedattn.errors import FedAttnError

if TYPE_CHECKING:
    from fedattn.network.meeting import FederationRun, Rendezvous
    from fedattn.report.schema import RunReport

T = TypeVar("T")

# (flag, dest) of each way to meet the other parties
GLOO_OPTIONS = (
    ("--rank", "rank"),
    ("--world-size", "world_size"),
    ("--master", "master"),
    ("--external-store", "external_store"),
)
GRPC_OPTIONS = (("--roster", "roster"), ("--name", "name"), ("--parties", "parties"))
TRANSPORTS = ("inprocess", "torch", "grpc")  # of a command that runs every party: here, or one local process each


def add_meeting_options(parser: argparse.ArgumentParser) -> None:
    """The gloo and the gRPC option groups, for ``meeting_from_args``."""
    gloo = parser.add_argument_group("over torch.distributed (gloo), at a rendezvous store")
    gloo.add_argument(
        "--rank", type=non_negative_int, help="this party's rank; the last rank starts the query (default: $RANK)"
    )
    gloo.add_argument("--world-size", type=positive_int, help="number of parties (default: $WORLD_SIZE)")
    gloo.add_argument(
        "--master",
        type=host_port,
        metavar="HOST:PORT",
        help="the rendezvous store (default: $MASTER_ADDR:$MASTER_PORT)",
    )
    gloo.add_argument("--external-store", action="store_true", help="the store is served by a launcher, not by rank 0")
    grpc = parser.add_argument_group("over gRPC with mutual TLS, in a federation")
    grpc.add_argument(
        "--roster", type=Path, metavar="FILE", help="the federation's roster (credentials beside it, by name)"
    )
    grpc.add_argument("--name", help="this party's name in the roster")
    grpc.add_argument(
        "--parties",
        type=name_list,
        metavar="A,B,...",
        help="the run's parties in rank order; the last starts the query (default: the roster's, in order)",
    )


def add_prompt_run_options(parser: argparse.ArgumentParser, whose: str) -> None:
    """A one-prompt command's: the prompt of ``whose`` (the party holding it), its template, where
    the parties run, how the report prints."""
    prompt_help = f"the {whose}'s prompt"
    parser.add_argument("--prompt", required=True, type=text_or_file, metavar="TEXT|@FILE", help=prompt_help)
    _add_template_and_output_options(parser)
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="inprocess",
        help="inprocess (default); or one local process per party over torch.distributed (gloo) or gRPC (mutual TLS)",
    )


def add_prompt_party_options(parser: argparse.ArgumentParser, prompt_help: str) -> None:
    """One party of a one-prompt run: how it meets the others, the prompt (one rank alone takes it,
    as words: ``prompt_help`` says which), its template, where its report goes."""
    add_meeting_options(parser)
    parser.add_argument("--prompt", metavar="TEXT|@FILE", help=prompt_help)
    _add_template_and_output_options(parser)
    parser.add_argument("--report", type=output_file, help="also write this party's JSON report here")


def _add_template_and_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", action="store_true", help="no chat template: the prompt is tokenized as is")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def meeting_from_args(args: argparse.Namespace) -> Rendezvous | FederationRun:
    """This party's place in the run: in a federation if any gRPC option is given, else at a rendezvous."""
    return _federation_run(args) if _given(args, GRPC_OPTIONS) else _rendezvous(args)


def report_path(template: Path | None, rank: int) -> Path | None:
    """Where this rank's report goes ('{rank}' in ``template`` is its rank); its folder is made now,
    so that a bad path fails before the run."""
    if template is None:
        return None
    path = Path(str(template).replace("{rank}", str(rank)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FedAttnError(f"--report {path}: cannot create its folder: {error.strerror}") from None
    if path.is_dir():
        raise FedAttnError(f"--report {path} is a folder, not a file")
    return path


def leave_with_report(
    report: RunReport, path: Path | None, printer: Callable[[RunReport, bool], None], as_json: bool
) -> None:
    """A party command's end: its report written to ``path`` (if any) and printed, then the process
    exits at once (``network.meeting.exit_now``: never blocked in gloo's teardown)."""
    from fedattn.network.meeting import exit_now

    if path is not None:
        path.write_text(json.dumps(report.to_json(), indent=2))
    printer(report, as_json)
    exit_now(0)


def _given(args: argparse.Namespace, options: tuple[tuple[str, str], ...]) -> list[str]:
    return [flag for flag, dest in options if getattr(args, dest) is not None and getattr(args, dest) is not False]


def _federation_run(args: argparse.Namespace) -> FederationRun:
    """This party's place in a run over gRPC: its rank is its name's place in --parties."""
    from fedattn.network.federation import load_roster
    from fedattn.network.meeting import FederationRun

    mixed = _given(args, GLOO_OPTIONS)
    if mixed:
        raise FedAttnError(
            f"{_given(args, GRPC_OPTIONS)[0]} (gRPC) and {mixed[0]} (gloo) exclude each other: a party joins a "
            "federation (--roster, --name, --parties) or a rendezvous (--rank, --world-size, --master)"
        )
    if args.roster is None or args.name is None:
        raise FedAttnError("a party in a federation needs both --roster FILE and --name NAME")
    if args.parties == []:
        raise FedAttnError("--parties names no party")
    roster = load_roster(args.roster)
    credentials = roster.credentials(args.name)
    names = args.parties or roster.names
    roster.check_run(names, starter=names[-1])  # in every system the last party starts the query
    if args.name not in names:
        raise FedAttnError(f"--name {args.name} is not one of the run's parties ({', '.join(names)})")
    return FederationRun(roster, tuple(names), names.index(args.name), credentials, args.timeout)


def _rendezvous(args: argparse.Namespace) -> Rendezvous:
    """This party's place in a run over gloo: from the options, or the environment torchrun sets."""
    from fedattn.network.meeting import Rendezvous

    rank = _or_environment(args.rank, "--rank", "RANK", non_negative_int)
    world_size = _or_environment(args.world_size, "--world-size", "WORLD_SIZE", positive_int)
    host, port = args.master or _master_from_environment()
    if not rank < world_size:
        raise FedAttnError(f"--rank must be in 0..{world_size - 1}, got {rank}")
    external = args.external_store or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return Rendezvous(host, port, rank, world_size, host_store=rank == 0 and not external, timeout_s=args.timeout)


def _or_environment(value: T | None, flag: str, variable: str, parse: Callable[[str], T]) -> T:
    """The option's value, else the environment variable torchrun sets, parsed as the option is."""
    if value is not None:
        return value
    word = os.environ.get(variable)
    if word is None:
        raise FedAttnError(f"{flag} is required (or ${variable})")
    try:
        return parse(word)
    except argparse.ArgumentTypeError as error:
        raise FedAttnError(f"${variable}: {error}") from None


def _master_from_environment() -> tuple[str, int]:
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise FedAttnError("--master HOST:PORT is required (or MASTER_ADDR and MASTER_PORT)")
    try:
        return host_port(f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    except argparse.ArgumentTypeError as error:
        raise FedAttnError(f"$MASTER_ADDR:$MASTER_PORT: {error}") from None
