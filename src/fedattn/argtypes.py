"""What every ``fedattn`` command line shares below the CLI package: value types for argparse
(each turns a word into a value or says in one line why it cannot), the prompt options, and the
way back from option values to words (for child processes and sweep points).

A value type refuses at parse time whatever the value alone shows to be impossible, so a careless
option ends as ``fedattn: error: argument --x: ...`` before any model is loaded. Library code
raises ``FedAttnError`` saying what is wrong with a value; ``library_type`` and ``naming_option``
add which option carried it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from fedattn.errors import FedAttnError

T = TypeVar("T")

SEED_RANGE = (-(2**31), 2**32 - 1)  # the seeded generators multiply the seed; torch takes 64 bits
DEVICE_TYPES = ("cpu", "cuda", "mps")


def int_in(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and number > maximum:
            raise argparse.ArgumentTypeError(f"must be in {minimum}..{maximum}, got {value}")
        return number

    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
seed_number = int_in(*SEED_RANGE)


def float_where(allowed: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """A float parser that refuses numbers outside ``allowed`` with ``requirement`` in the message."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if not allowed(number):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
        return number

    return parse


positive_float = float_where(lambda number: 0 < number < math.inf, "must be a finite number > 0")
ratio = float_where(lambda number: 0.0 < number <= 1.0, "ratio must be in (0, 1]")  # a keep ratio
probability_mass = float_where(lambda number: 0.0 < number <= 1.0, "must be in (0, 1]")  # top-p
non_negative_float = float_where(
    lambda number: 0.0 <= number < math.inf, "must be a finite number >= 0"
)  # a noise scale, a temperature


def library_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a library parser: its one-line ``FedAttnError`` becomes argparse's
    ``argument --x: ...``, so the library need not know the option's name."""

    def convert(value: str) -> T:
        try:
            return parse(value)
        except FedAttnError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


@contextmanager
def naming_option(option: str) -> Iterator[None]:
    """Prefix a library error with the option whose value caused it (checks that need the model)."""
    try:
        yield
    except FedAttnError as error:
        raise FedAttnError(f"{option}: {error}") from None


def read_text(value: str) -> str:
    """TEXT, or @FILE for the file's contents."""
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FedAttnError(f"cannot read {value}: {getattr(error, 'strerror', None) or error}") from None


text_or_file = library_type(read_text)


def output_file(value: str) -> Path:
    """A file to write (its folder is created): refused if it names an existing folder."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder, not a file")
    return path


def output_folder(value: str) -> Path:
    """A folder to write into (created if missing): refused if it names an existing file."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, not a folder")
    return path


def existing_path(value: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {value}")
    return path


def device_name(value: str) -> str:
    """cpu, cuda, cuda:N or mps, as torch spells them (whether this machine has it is checked
    when the run starts: ``runtime.devices.resolve_device``)."""
    kind, _, index = value.partition(":")
    if kind not in DEVICE_TYPES or (index and not (kind == "cuda" and index.isdigit())):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or mps, got {value!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """A parser whose errors are one-line ``FedAttnError``s (exit 2, no usage block): the command
    line's, and a service's reading of a query's option words."""

    def error(self, message: str) -> None:
        raise FedAttnError(message)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype and --device: the one model a party loads (FedAttn's, FedSEA's), loaded once."""
    from fedattn.runtime.models import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a known model name, 'tiny-random', or a local HF directory / GGUF file (default {DEFAULT_MODEL})",
    )
    add_placement_options(parser)


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    """--dtype and --device: where a party's model runs, in which precision (every system's)."""
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype of the model(s)"
    )
    parser.add_argument(
        "--device", type=device_name, default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)"
    )


def name_list(value: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] (empty items dropped)."""
    return [word.strip() for word in value.split(",") if word.strip()]


def host_port(value: str) -> tuple[str, int]:
    host, _, number = value.rpartition(":")
    if not host or not number.isdigit() or not 1 <= int(number) <= 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port in 1..65535, got {value!r}")
    return host, int(number)


def add_prompt_options(parser: argparse.ArgumentParser, *, question_required: bool, one_party: bool = False) -> None:
    """--context, --question and --publisher-context (TEXT or @FILE).

    ``one_party``: a process that runs one party takes at most one --context and keeps the words
    as given, since an @FILE path may hold '{rank}' and only its role says which text it reads."""
    text = None if one_party else text_or_file
    if one_party:
        parser.add_argument("--context", metavar="TEXT|@FILE", help="a collaborator's private text")
    else:
        parser.add_argument(
            "--context",
            action="append",
            default=[],
            type=text,
            metavar="TEXT|@FILE",
            help="one collaborator's private text, in order (repeat)",
        )
    parser.add_argument(
        "--question", required=question_required, type=text, metavar="TEXT|@FILE", help="the task publisher's question"
    )
    parser.add_argument(
        "--publisher-context",
        type=text,
        metavar="TEXT|@FILE",
        help="the publisher's own private text, before the question",
    )


def option_words(options: Mapping[str, Any]) -> list[str]:
    """Option values back into the words that give them: {'sync_every': 4, 'all_answers': True,
    'sync_layers': (0, 4)} -> ['--sync-every', '4', '--all-answers', '--sync-layers', '0,4'];
    None and False give no words."""
    words: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, ",".join(map(str, value))]
        elif value is not None and value is not False:
            words += [flag, str(value)]
    return words


def read_query_words(words: list[str], add_options: Callable[[argparse.ArgumentParser], None]) -> argparse.Namespace:
    """A service query's option words, read as ``add_options`` declares them (one line if not)."""
    parser = OneLineParser(prog="the query's options", add_help=False, allow_abbrev=False)
    add_options(parser)
    return parser.parse_args(words)


def add_timeout_option(parser: argparse.ArgumentParser) -> None:
    """--timeout: how long a networked party waits on a peer without progress before naming it."""
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=60.0,
        help="networked runs: seconds without progress from a party before giving up (default 60)",
    )
