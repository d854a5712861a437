"""SpecFed's settings: who the workers are (model, weight), the draft, and how a round is sent.

``add_model_options`` and ``add_run_options`` declare them once for ``fedattn specfed``, its party
processes and ``fedattn eval --system specfed``; ``config_from_args`` validates them before any
model is loaded; ``load_models`` loads each distinct model once. A service (``fedattn serve``)
holds one model (``add_serve_options``); its queries' settings come as words
(``add_query_options``, ``query_from_words``, ``query_config``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fedattn.argtypes import (
    add_placement_options,
    add_timeout_option,
    float_where,
    non_negative_float,
    non_negative_int,
    option_words,
    positive_int,
    read_query_words,
    seed_number,
)
from fedattn.errors import FedAttnError
from fedattn.runtime.models import LoadedModel, load_model

LOOKUP_DRAFT = "lookup"  # prompt lookup: drafts copied from an earlier occurrence of the last tokens, no model
MODEL_DRAFT = "model"  # a draft model (the server's own)
RECONSTRUCTIONS = ("renormalize", "redistribute")
ENCODINGS = ("f32", "f16", "packed")
# the options ``add_run_options`` declares: how a round is drafted, sent, rebuilt and accepted, and when it ends
RUN_OPTIONS = (
    "gamma",
    "top_k",
    "adaptive_eps",
    "reconstruct",
    "encoding",
    "temperature",
    "seed",
    "max_new_tokens",
    "timeout",
)
# what every party of a networked run is given alike (the launcher passes them on; the device is each party's)
SHARED_OPTIONS = ("workers", "draft", "dtype", *RUN_OPTIONS, "raw")
# a service query's option words (``add_query_options``): every party reads them
QUERY_OPTIONS = ("weights", "draft", "raw", *RUN_OPTIONS)
DEFAULT_GAMMA = 4
DEFAULT_TOP_K = 64


@dataclass(frozen=True)
class WorkerSpec:
    model: str | None  # None: another party's model, which a service does not know (each serves its own)
    weight: float  # normalized: the workers' weights sum to 1


@dataclass(frozen=True)
class SpecFedConfig:
    workers: tuple[WorkerSpec, ...]
    draft: str | None  # a model name, or LOOKUP_DRAFT; None: the server's model, unknown to a worker's service
    gamma: int  # drafts per round; 0 is plain ensemble decoding, one token per round
    top_k: int | None  # tokens sent per position (the cap, when adaptive); None sends the full distribution
    adaptive_eps: float | None  # adaptive K: the fewest tokens whose mass reaches 1 - eps (at most top_k)
    reconstruct: str
    encoding: str
    temperature: float  # 0 is greedy
    seed: int
    max_new_tokens: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def draft_kind(self) -> str:
        """'lookup' or 'model': what the workers must know of the draft (not which model it is)."""
        return LOOKUP_DRAFT if self.draft == LOOKUP_DRAFT else MODEL_DRAFT

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["workers"] = [asdict(worker) for worker in self.workers]
        return document

    def fingerprint(self) -> bytes:
        """What every party must agree on, as 8 bytes for the handshake: the weights by rank and how
        rounds are drafted, sent, rebuilt and accepted; not whose models they are (each party holds
        its own, and a service's server does not choose the workers': their tokenizers are checked
        at the handshake instead)."""
        agreed = self.to_json()
        del agreed["workers"], agreed["draft"]
        agreed |= {"weights": [worker.weight for worker in self.workers], "draft_kind": self.draft_kind}
        return hashlib.sha256(json.dumps(agreed, sort_keys=True).encode()).digest()[:8]


def worker_spec(word: str) -> WorkerSpec:
    """NAME[:WEIGHT] (a weight is relative: they are normalized to sum 1; default 1)."""
    name, colon, weight = word.rpartition(":") if ":" in word else (word, "", "")
    if not colon:
        return WorkerSpec(word, 1.0)
    if not name:
        raise argparse.ArgumentTypeError(f"no model name in {word!r}; expected NAME[:WEIGHT]")
    return WorkerSpec(name, weight_value(weight, f"{weight!r} in {word!r}; expected NAME[:WEIGHT]"))


def weight_list(word: str) -> list[float]:
    """W1,W2,...: the workers' weights by rank (relative: normalized to sum 1)."""
    return [weight_value(weight, f"{weight!r} in {word!r}; expected W1,W2,...") for weight in word.split(",")]


def weight_value(weight: str, where: str) -> float:
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a weight: {where}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"a worker's weight must be a finite number > 0, got {weight}")
    return value


def top_k_value(word: str) -> int | None:
    """K >= 1, or 'all' (None): the full distribution."""
    if word == "all":
        return None
    return positive_int(word)


eps_target = float_where(lambda number: 0.0 < number < 1.0, "must be in (0, 1)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The models (each worker's, the draft's), in which dtype, on which device: loaded once."""
    parser.add_argument(
        "--worker",
        dest="workers",
        action="append",
        type=worker_spec,
        required=True,
        metavar="NAME[:WEIGHT]",
        help="a worker's model and its weight in the ensemble (repeat; weights are normalized; default 1 each)",
    )
    parser.add_argument(
        "--draft",
        required=True,
        metavar="NAME|lookup",
        help="the server's draft model (of the workers' tokenizer), or 'lookup' (drafts copied from the prompt)",
    )
    add_placement_options(parser)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """A service's one model (``fedattn serve --system specfed``): a worker's own model when the
    service is a query's worker; as the asker's (the query's server) its draft model, or only its
    tokenizer when the query drafts by prompt lookup."""
    parser.add_argument(
        "--model",
        required=True,
        help="this party's model: verifies as a worker, drafts as the server (the asker); one tokenizer for all",
    )
    add_placement_options(parser)


def add_query_options(parser: argparse.ArgumentParser) -> None:
    """A service query's settings (``fedattn ask --system specfed``), sent to every party as words:
    the workers' weights by rank, the kind of draft, the prompt's template and the run options."""
    parser.add_argument(
        "--weights",
        type=weight_list,
        metavar="W1,W2,...",
        help="each worker's weight in the ensemble, in the order of --parties (normalized; default equal)",
    )
    parser.add_argument(
        "--draft",
        choices=(MODEL_DRAFT, LOOKUP_DRAFT),
        default=MODEL_DRAFT,
        help="the asker's service drafts with its model (default), or by prompt lookup (its model's tokenizer only)",
    )
    parser.add_argument("--raw", action="store_true", help="no chat template: the prompt is tokenized as is")
    add_run_options(parser)


def option_words_of(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The options ``names`` as words that give them again (``--top-k all`` too, which has no value)."""
    words = option_words({name: getattr(args, name) for name in names})
    return words + (["--top-k", "all"] if "top_k" in names and args.top_k is None else [])


def query_from_words(words: list[str]) -> argparse.Namespace:
    """A service query's option words, read as ``add_query_options`` declares them (one line if not)."""
    return read_query_words(words, add_query_options)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """How a round is drafted, sent, rebuilt and accepted, and when the answer ends."""
    parser.add_argument(
        "--gamma",
        type=non_negative_int,
        default=DEFAULT_GAMMA,
        metavar="G",
        help=f"drafts per round (default {DEFAULT_GAMMA}); 0 = plain ensemble decoding, one token per round",
    )
    parser.add_argument(
        "--top-k",
        type=top_k_value,
        default=DEFAULT_TOP_K,
        metavar="K|all",
        help=f"tokens each worker sends per position (default {DEFAULT_TOP_K}); 'all' sends full distributions",
    )
    parser.add_argument(
        "--adaptive-eps",
        type=eps_target,
        metavar="EPS",
        help="adaptive K: per position the fewest tokens whose mass reaches 1 - EPS, at most --top-k",
    )
    parser.add_argument(
        "--reconstruct",
        choices=RECONSTRUCTIONS,
        default="redistribute",
        help="how the server rebuilds a truncated distribution (default redistribute)",
    )
    parser.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default="f32",
        help="a top-K record on the wire: f32 (int32 ids, float32: lossless), f16 (int32, float16), "
        "packed (18-bit ids for Qwen's vocabulary, 8-bit log probabilities) (default f32)",
    )
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=seed_number, default=0, help="seed of the server's draws (sampling only)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    add_timeout_option(parser)


def config_from_args(args: argparse.Namespace) -> SpecFedConfig:
    """The options as a configuration; refuses what they alone rule out (before any load)."""
    models = [worker.model for worker in args.workers]
    return _config(args, models, [worker.weight for worker in args.workers], args.draft)


def query_config(args: argparse.Namespace, workers: int, rank: int, model: str) -> SpecFedConfig:
    """A service query's configuration as party ``rank`` of ``workers`` and a server sees it: the
    one model it knows is its own ``model`` (a worker's at its rank; the server's draft, unless the
    query drafts by prompt lookup)."""
    weights = args.weights or [1.0] * workers
    if len(weights) != workers:
        raise FedAttnError(f"--weights gives {len(weights)} weights for a query of {workers} workers")
    models = [model if index == rank else None for index in range(workers)]
    if args.draft == LOOKUP_DRAFT:
        draft = LOOKUP_DRAFT
    else:
        draft = model if rank == workers else None
    return _config(args, models, weights, draft)


def _config(
    args: argparse.Namespace, models: Sequence[str | None], weights: Sequence[float], draft: str | None
) -> SpecFedConfig:
    if args.adaptive_eps is not None and args.top_k is None:
        raise FedAttnError("--adaptive-eps needs a cap: give --top-k K (the most tokens a position may send)")
    total = sum(weights)
    return SpecFedConfig(
        workers=tuple(WorkerSpec(model, weight / total) for model, weight in zip(models, weights, strict=True)),
        draft=draft,
        gamma=args.gamma,
        top_k=args.top_k,
        adaptive_eps=args.adaptive_eps,
        reconstruct=args.reconstruct,
        encoding=args.encoding,
        temperature=args.temperature,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )


def model_names(config: SpecFedConfig) -> list[str]:
    """Every distinct model of the run, the workers' first (in order), then the draft's."""
    names = [worker.model for worker in config.workers]
    if config.draft != LOOKUP_DRAFT:
        names.append(config.draft)
    return list(dict.fromkeys(names))


def load_models(names: list[str], device: str, dtype: str, progress: bool = True) -> dict[str, LoadedModel]:
    """Each named model once (two workers of one model share it: the weights are only read)."""
    return {name: load_model(name, device=device, dtype=getattr(torch, dtype), progress=progress) for name in names}
