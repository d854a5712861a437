"""FedSEA's settings: the client's blocks (A first, C last), the noise on what it sends, the codec
of hidden states on the wire, and decoding.

``add_run_options`` declares them once for ``fedattn split``, its party processes, ``fedattn eval
--system split`` and a service query's words; ``config_from_args`` validates them before any model
is loaded. What the server must know (A, C, the codec, both noise settings) is agreed at the
handshake (``frames.ClientHello``); the seeds of the client's draws never leave it.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

from fedattn.argtypes import (
    add_timeout_option,
    non_negative_float,
    positive_int,
    read_query_words,
    seed_number,
)
from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import CODECS, get_codec
from fedattn.runtime.decoding import Decoding

DEFAULT_CLIENT_BLOCKS = (2, 2)
DEFAULT_HIDDEN_CODEC = "float32"  # lossless: with no noise a split answer is the whole model's, token for token
MAX_CLIENT_BLOCKS = 5  # a server's default limit on A and C (FedSEA's code allows 1..5)
# the options ``add_run_options`` declares, as a query's words give them again
RUN_OPTIONS = (
    "client_blocks",
    "noise",
    "noise_relative",
    "reply_noise",
    "hidden_codec",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "noise_seed",
    "max_new_tokens",
    "timeout",
)


@dataclass(frozen=True)
class Noise:
    """Elementwise Gaussian noise of mean absolute value ``level`` (or ``level`` times the mean |h|
    of the very tensor, when ``relative``): ``privacy.noise.add_hidden_noise``."""

    level: float = 0.0
    relative: bool = False

    @property
    def off(self) -> bool:
        return self.level == 0.0

    def describe(self) -> str:
        if self.off:
            return "none"
        return f"{self.level:g} x mean|h|" if self.relative else f"{self.level:g} mean |noise|"


@dataclass(frozen=True)
class SplitConfig:
    client_blocks: tuple[int, int]  # (A, C): the client runs blocks [0, A) and [L - C, L)
    noise: Noise  # on the hidden states the client sends
    reply_noise: Noise  # on the server's reply, added by the server (the same mode as ``noise``)
    hidden_codec: str
    decoding: Decoding
    max_new_tokens: int
    # the noise's draws: None (the default) seeds each session from the OS, a secret of the client's;
    # a fixed seed makes runs reproducible but lets anyone who knows it subtract the noise
    noise_seed: int | None = None

    @property
    def first(self) -> int:
        return self.client_blocks[0]

    @property
    def last(self) -> int:
        return self.client_blocks[1]

    def server_blocks(self, num_blocks: int) -> tuple[int, int]:
        """[A, L - C): the blocks the server runs for this client."""
        return self.first, num_blocks - self.last

    def check(self, num_blocks: int, limit: int = MAX_CLIENT_BLOCKS) -> None:
        """Refuse a split that leaves the server nothing, or that the server does not serve."""
        first, last = self.client_blocks
        if first + last >= num_blocks:
            raise FedAttnError(
                f"--client-blocks {first},{last}: A + C = {first + last} leaves the server none of the model's "
                f"{num_blocks} blocks (A + C must be below {num_blocks})"
            )
        self.check_served(limit)

    def check_served(self, limit: int = MAX_CLIENT_BLOCKS) -> None:
        """Refuse A or C beyond what the server serves (before any model is loaded)."""
        first, last = self.client_blocks
        if not (1 <= first <= limit and 1 <= last <= limit):
            raise FedAttnError(f"--client-blocks {first},{last}: the server serves A and C in 1..{limit}")

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["client_blocks"] = list(self.client_blocks)
        return document


def client_blocks(word: str) -> tuple[int, int]:
    """A,C: blocks the client keeps first and last (each at least 1)."""
    parts = word.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"{word!r}: expected A,C (two whole numbers, e.g. 2,2)")
    first, last = (int(part) for part in parts)
    if first < 1 or last < 1:
        raise argparse.ArgumentTypeError(f"{word!r}: the client keeps at least one block at each end (A, C >= 1)")
    return first, last


def hidden_codec(word: str) -> str:
    try:
        return get_codec(word).name
    except FedAttnError as error:
        raise argparse.ArgumentTypeError(str(error).replace("KV codec", "hidden-state codec")) from None


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Where the model is cut, what noise goes on the wire and how, and how the answer is decoded."""
    parser.add_argument(
        "--client-blocks",
        type=client_blocks,
        default=DEFAULT_CLIENT_BLOCKS,
        metavar="A,C",
        help="blocks the client runs itself: the first A and the last C (default %(default)s as A,C); "
        "the server runs the rest",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument(
        "--noise",
        type=non_negative_float,
        default=None,
        metavar="LEVEL",
        help="Gaussian noise of this mean absolute value on the hidden states the client sends (default off)",
    )
    noise.add_argument(
        "--noise-relative",
        type=non_negative_float,
        default=None,
        metavar="R",
        help="noise whose mean absolute value is R times the mean |h| of each tensor sent (portable across models)",
    )
    parser.add_argument(
        "--reply-noise",
        type=non_negative_float,
        default=0.0,
        metavar="LEVEL",
        help="noise the server adds to its replies, in the same form as the client's (default 0: none)",
    )
    parser.add_argument(
        "--hidden-codec",
        type=hidden_codec,
        default=DEFAULT_HIDDEN_CODEC,
        metavar="CODEC",
        help=f"hidden states on the wire: {', '.join(CODECS)} (default {DEFAULT_HIDDEN_CODEC}: lossless)",
    )
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample from the K likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of mass P")
    parser.add_argument("--seed", type=seed_number, default=0, help="seed of the client's sampling draws")
    parser.add_argument(
        "--noise-seed",
        type=seed_number,
        default=None,
        help="seed of the noise (reproducible runs; whoever knows it can subtract the noise); "
        "default: a fresh secret seed per session",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    add_timeout_option(parser)


def config_from_args(args: argparse.Namespace) -> SplitConfig:
    """The options as a configuration (refusing what they alone rule out, before any load)."""
    relative = args.noise_relative is not None
    level = args.noise_relative if relative else (args.noise or 0.0)
    return SplitConfig(
        client_blocks=tuple(args.client_blocks),
        noise=Noise(level, relative),
        reply_noise=Noise(args.reply_noise, relative),
        hidden_codec=args.hidden_codec,
        decoding=Decoding(args.temperature, args.top_k, args.top_p, args.seed),
        max_new_tokens=args.max_new_tokens,
        noise_seed=args.noise_seed,
    )


def query_from_words(words: list[str]) -> argparse.Namespace:
    """A service query's option words: the run options and --raw."""
    return read_query_words(words, add_query_options)


def add_query_options(parser: argparse.ArgumentParser) -> None:
    add_run_options(parser)
    parser.add_argument("--raw", action="store_true")
