"""FedAttn's run configuration: what every party must agree on, its command-line options, and
how parsed options become a ``RunConfig`` (validated before the slow model load).

The CLI, the evaluations and the launcher all build a run through ``add_options`` and
``configure``; nothing here knows about the CLI package.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from fedattn.argtypes import (
    OneLineParser,
    add_model_options,
    add_timeout_option,
    library_type,
    naming_option,
    non_negative_float,
    positive_int,
    probability_mass,
    ratio,
    seed_number,
)
from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import CODECS, KVCodec, get_codec
from fedattn.runtime.decoding import Decoding
from fedattn.runtime.devices import resolve_device
from fedattn.systems.fedattn.exchange import Exchange
from fedattn.systems.fedattn.schedule import NAMED_SCHEDULES, Schedule, check_layers, parse_layers
from fedattn.systems.fedattn.sparsity import Sparsity


@dataclass(frozen=True)
class RunConfig:
    """Everything the parties must agree on before a run."""

    schedule: Schedule
    sparsity: Sparsity = field(default_factory=Sparsity)
    codec: KVCodec = CODECS["float32"]
    exchange: Exchange = field(default_factory=Exchange)
    decoding: Decoding = field(default_factory=Decoding)
    max_new_tokens: int = 64
    all_answers: bool = False
    record_logits: bool = False


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
MODEL_OPTIONS = ("model", "dtype", "device")  # a service's own: fixed when it starts
RUN_OPTIONS = tuple(name for name in SHARED_OPTIONS if name not in MODEL_OPTIONS)  # a query's, from its starter


def _known_codec(name: str) -> str:
    """``name`` as given (result folders record it so) if it names a codec."""
    get_codec(name)
    return name


block_list = library_type(parse_layers)  # '0,8,16' or '12-23'; the model's depth is checked once it is loaded
codec_name = library_type(_known_codec)


def add_options(parser: argparse.ArgumentParser) -> None:
    """Every option of a run: the model's (what a service fixes when it starts) and the run's."""
    add_model_options(parser)
    add_run_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What one query runs with: schedule, sparsity, decoding, K/V exchange, prompt, timeout."""
    from fedattn.systems.fedattn.exchange import SELECTIONS
    from fedattn.systems.fedattn.schedule import PLACEMENTS

    sync = parser.add_mutually_exclusive_group()
    sync.add_argument(
        "--sync-every",
        type=positive_int,
        metavar="H",
        help="block l is global iff l %% H == 0 (default 4; 1 = centralized)",
    )
    sync.add_argument("--sync-layers", type=block_list, metavar="0,8,16", help="explicit global blocks")
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
        type=block_list,
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
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=positive_int)
    parser.add_argument("--top-p", type=probability_mass)
    parser.add_argument("--seed", type=seed_number, default=0, help="seed of sampling and of sparse draws")
    parser.add_argument(
        "--kv-codec",
        type=codec_name,
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
    parser.add_argument("--all-answers", action="store_true", help="also decode every collaborator's answer")
    parser.add_argument("--raw", action="store_true", help="no chat template: each party's text is tokenized as is")
    add_timeout_option(parser)


def _refuse_schedule_conflicts(args: argparse.Namespace) -> None:
    """Schedule options that exclude each other (argparse's groups cannot say it: --placement goes
    with --sync-every but not with --sync-layers)."""
    named = NAMED_SCHEDULES.get(args.schedule)
    if named is not None and named.sync_layers is not None:
        if args.sync_every is not None or args.sync_layers is not None or args.placement:
            raise FedAttnError(
                f"--schedule {args.schedule} sets the sync blocks itself: "
                "drop --sync-every, --sync-layers and --placement"
            )
    if args.sync_layers is not None and args.placement:
        raise FedAttnError("--placement and --sync-layers exclude each other")


def schedule_from_args(args: argparse.Namespace, num_layers: int) -> Schedule:
    from fedattn.systems.fedattn.schedule import every, placement, sync_count

    named = NAMED_SCHEDULES.get(args.schedule)
    if named is not None and named.sync_layers is not None:
        return Schedule(
            num_layers, named.sync_layers(num_layers), named.publisher_layers(num_layers), args.publisher_sync_every
        )
    if named is not None:
        publisher_layers = named.publisher_layers(num_layers)
    elif args.publisher_layers:
        with naming_option("--publisher-layers"):
            publisher_layers = check_layers(args.publisher_layers, num_layers)
    else:
        publisher_layers = ()
    if args.sync_layers is not None:
        with naming_option("--sync-layers"):
            layers = check_layers(args.sync_layers, num_layers)
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


def _model_free_parts(args: argparse.Namespace) -> dict:
    """Every ``RunConfig`` field but the schedule, whose blocks need the model's depth."""
    _refuse_schedule_conflicts(args)
    named = NAMED_SCHEDULES.get(args.schedule)

    def recipe(option: str):  # the named schedule's value for an option the user did not give
        return getattr(named, option) if named is not None else None

    ratio_comm = args.ratio_comm or recipe("ratio_comm") or 1.0
    return {
        "sparsity": Sparsity(
            args.ratio_comp, ratio_comm, args.ratio_comp_publisher, args.ratio_comm_publisher, seed=args.seed
        ),
        "codec": get_codec(args.kv_codec or recipe("kv_codec") or args.dtype),
        "exchange": Exchange(
            select=args.kv_select or recipe("kv_select") or "random", budget=args.kv_budget, noise=args.kv_noise
        ),
        "decoding": Decoding(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
        "max_new_tokens": args.max_new_tokens,
        "all_answers": args.all_answers,
    }


def check_options(args: argparse.Namespace) -> str:
    """Refuse what the options alone (and this machine's devices) rule out, before any model is
    loaded; the device the run will use. ``configure`` does this too; a launcher that only starts
    other processes calls it so that a careless option fails once, here, not in every party."""
    _model_free_parts(args)
    return resolve_device(args.device)


def configure(args: argparse.Namespace):
    """The model and the run configuration from the shared options (validated before the slow load)."""
    parts = _model_free_parts(args)
    loaded, device = load_from_options(args, progress=not args.json)
    config = RunConfig(schedule=schedule_from_args(args, loaded.model.config.num_hidden_layers), **parts)
    return loaded, config, device


def load_from_options(args: argparse.Namespace, progress: bool):
    """The model the model options name (``add_model_options``), and the device it is on."""
    import torch

    from fedattn.runtime.models import load_model

    device = resolve_device(args.device)
    return load_model(args.model, device=device, dtype=getattr(torch, args.dtype), progress=progress), device


def run_config_from_words(words: list[str], dtype: str, num_layers: int) -> tuple[RunConfig, argparse.Namespace]:
    """A query's configuration from its run option words (a service's model fixes ``dtype`` and the
    depth); the parsed options too. Words that are not run options are refused in one line."""
    parser = OneLineParser(prog="the query's options", add_help=False, allow_abbrev=False)
    add_run_options(parser)
    args = parser.parse_args(words, namespace=argparse.Namespace(dtype=dtype))
    return RunConfig(schedule=schedule_from_args(args, num_layers), **_model_free_parts(args)), args
