"""FedRefine's settings: the receiver, its sharers (each with the projector folder of that pair),
the K/V codec of the sharers' caches, the rephrasing mode and decoding.

``add_run_options`` declares what every party of a query reads alike (``fedattn refine``, its party
processes and a service query's words); ``config_from_args`` validates them before any model is
loaded. A sharer is ``NAME[:DIR]``: the sharer model and the folder of the projectors trained for
it and the receiver; without a folder, the committed default projector of that pair
(``default_projector_dir``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedattn.argtypes import add_timeout_option, non_negative_float, positive_int, read_query_words, seed_number
from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import CODECS, get_codec
from fedattn.runtime.decoding import Decoding
from fedattn.systems.fedrefine.projector import CONFIG_FILE

DEFAULT_KV_CODEC = "float32"  # lossless: the receiver fuses the sharer's cache exactly as its own runner read it
REPHRASE_TOKENS = 128  # the most tokens of the receiver's rephrasing of the question
PROJECTORS = Path(__file__).parent / "projectors"  # committed projectors, one folder per pair
# the options ``add_run_options`` declares, as a query's words give them again
RUN_OPTIONS = ("sharer", "kv_codec", "rephrase", "temperature", "top_k", "top_p", "seed", "max_new_tokens", "timeout")


@dataclass(frozen=True)
class SharerSpec:
    """A sharer model by name (or path), and the projector folder for it (None: the default one)."""

    model: str
    projector: Path | None = None

    def word(self) -> str:
        return self.model if self.projector is None else f"{self.model}:{self.projector}"


@dataclass(frozen=True)
class RefineConfig:
    sharers: tuple[SharerSpec, ...]
    kv_codec: str
    rephrase: bool
    decoding: Decoding
    max_new_tokens: int

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["sharers"] = [spec.word() for spec in self.sharers]
        return document


def sharer_spec(word: str) -> SharerSpec:
    """NAME[:DIR]: a sharer model and, optionally, its projector folder (split at the first colon)."""
    model, colon, directory = word.partition(":")
    if not model.strip() or (colon and not directory.strip()):
        raise argparse.ArgumentTypeError(f"{word!r}: expected NAME or NAME:PROJECTOR_DIR")
    # absolute: a run's words reach party processes and the asker's service, which may not share its folder
    return SharerSpec(model.strip(), Path(directory.strip()).expanduser().resolve() if colon else None)


def kv_codec(word: str) -> str:
    try:
        return get_codec(word).name
    except FedAttnError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def projector_folder_name(receiver: str, sharer: str) -> str:
    """A committed projector's folder: '<receiver>--<sharer>' (a path's last part stands for it)."""
    return f"{Path(receiver).name}--{Path(sharer).name}"


def default_projector_dir(receiver: str, sharer: str) -> Path | None:
    """The committed projector for this pair, if there is one (a folder holding its description)."""
    directory = PROJECTORS / projector_folder_name(receiver, sharer)
    return directory if (directory / CONFIG_FILE).is_file() else None


def projector_dir(receiver: str, spec: SharerSpec) -> Path:
    """The projector folder a sharer uses: its own, else the committed default, else a one-line refusal."""
    if spec.projector is not None:
        return spec.projector
    found = default_projector_dir(receiver, spec.model)
    if found is None:
        raise FedAttnError(
            f"no projector for receiver {receiver} and sharer {spec.model}: give --sharer {spec.model}:DIR "
            f"or train one with `fedattn refine train --receiver {receiver} --sharer {spec.model} --out DIR`"
        )
    return found


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The sharers, the codec of their caches, rephrasing and decoding."""
    add_fusion_options(parser)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample from the K likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of mass P")
    parser.add_argument("--seed", type=seed_number, default=0, help="seed of the receiver's sampling draws")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    add_timeout_option(parser)


def add_fusion_options(parser: argparse.ArgumentParser) -> None:
    """What every FedRefine run names (a query, an evaluation): the sharers with their projectors,
    the codec of their caches, and the private mode."""
    parser.add_argument(
        "--sharer",
        action="append",
        type=sharer_spec,
        default=[],
        metavar="NAME[:PROJECTOR_DIR]",
        help="a sharer model and its projector folder (default: the committed one for the pair); "
        "repeat, in fusion order; none: the receiver alone",
    )
    parser.add_argument(
        "--kv-codec",
        type=kv_codec,
        default=DEFAULT_KV_CODEC,
        metavar="CODEC",
        help=f"the sharers' caches on the wire: {', '.join(CODECS)} (default {DEFAULT_KV_CODEC}: lossless)",
    )
    parser.add_argument(
        "--rephrase",
        action="store_true",
        help="private mode: the receiver's model rephrases the question first, and only the rephrasing is used",
    )


def config_from_args(args: argparse.Namespace) -> RefineConfig:
    """The options as a configuration (refusing what they alone rule out, before any load)."""
    return RefineConfig(
        sharers=tuple(args.sharer),
        kv_codec=args.kv_codec,
        rephrase=args.rephrase,
        decoding=Decoding(args.temperature, args.top_k, args.top_p, args.seed),
        max_new_tokens=args.max_new_tokens,
    )


def query_from_words(words: list[str]) -> argparse.Namespace:
    """A service query's option words: the run options and --raw."""
    return read_query_words(words, add_query_options)


def add_query_options(parser: argparse.ArgumentParser) -> None:
    add_run_options(parser)
    parser.add_argument("--raw", action="store_true")


def option_words_of(args: argparse.Namespace) -> list[str]:
    """The run options as words again (``--sharer`` once per sharer, in order)."""
    from fedattn.argtypes import option_words

    words = [word for spec in args.sharer for word in ("--sharer", spec.word())]
    rest = {name: getattr(args, name) for name in RUN_OPTIONS if name != "sharer"}
    return words + option_words(rest) + (["--raw"] if args.raw else [])
