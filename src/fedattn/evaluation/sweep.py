"""``fedattn sweep CONFIG.toml``: run a grid of evaluations, one resumable result folder per point.

    benchmark = "gsm8k"            # or "crossfacts"
    out = "results/h-sweep"        # one sub-folder per grid point
    plot = true                    # draw the PNGs of ``fedattn plot`` at the end

    [base]                         # options of ``fedattn eval BENCHMARK``, without dashes
    model = "qwen2.5-coder-0.5b-instruct"
    limit = 100

    [grid]                         # every combination of these is one point
    sync_every = [2, 4, 8]
    parties = [4]

A point's folder is named after its grid values, so rerunning the sweep resumes every point.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from pathlib import Path

import tomllib

from fedattn.argtypes import naming_option, option_words
from fedattn.errors import FedAttnError

BENCHMARKS = ("gsm8k", "crossfacts")
KEYS = ("benchmark", "out", "plot", "base", "grid")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the sweep's TOML file")
    parser.add_argument("--dry-run", action="store_true", help="list the points and their commands, run nothing")


def load_sweep(path: Path) -> dict:
    try:
        sweep = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FedAttnError(f"cannot read {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise FedAttnError(f"{path} is not valid TOML: {error}") from None
    unknown = sorted(set(sweep) - set(KEYS))
    if unknown:
        raise FedAttnError(f"{path}: unknown key {unknown[0]!r} (a sweep has {', '.join(KEYS)})")
    if sweep.get("benchmark") not in BENCHMARKS:
        raise FedAttnError(f"{path}: 'benchmark' must be one of {', '.join(BENCHMARKS)}")
    if not isinstance(sweep.get("out"), str):
        raise FedAttnError(f"{path}: 'out' (the folder for the results) is required")
    for table in ("base", "grid"):
        if not isinstance(sweep.get(table, {}), dict):
            raise FedAttnError(f"{path}: '{table}' must be a table of options")
        if "out" in sweep.get(table, {}):
            raise FedAttnError(f"{path}: {table}.out: each point's folder is named by the sweep, under 'out'")
    for key, values in sweep.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise FedAttnError(f"{path}: grid.{key} must be a non-empty list")
    return sweep


def points(sweep: dict) -> list[dict]:
    """Every combination of the grid, each merged over the base options."""
    grid = sweep.get("grid", {})
    keys = sorted(grid)
    return [
        dict(sweep.get("base", {})) | dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))
    ]


def point_folder(sweep: dict, point: dict) -> Path:
    grid_keys = sorted(sweep.get("grid", {}))
    name = ",".join(f"{key}={point[key]}" for key in grid_keys) or "base"
    return Path(sweep["out"]) / name.replace("/", "_")


def run(
    args: argparse.Namespace,
    parse: Callable[[list[str]], argparse.Namespace],
    dispatch: Callable[[argparse.Namespace], int],
) -> int:
    """Run every point as the ``fedattn`` command line it prints. The CLI lends its own parser and
    dispatch (this layer cannot import the CLI); every point is parsed before the first one runs,
    so a bad option anywhere in the grid costs no run."""
    sweep = load_sweep(args.config)
    folders = [point_folder(sweep, point) for point in points(sweep)]
    commands = [
        ["eval", sweep["benchmark"], *option_words(point), "--out", str(folder)]
        for point, folder in zip(points(sweep), folders)
    ]
    with naming_option(str(args.config)):
        parsed = [parse(words) for words in commands]
    for words, point_args in zip(commands, parsed):
        print(("would run: fedattn " if args.dry_run else "== fedattn ") + " ".join(words))
        if not args.dry_run and (code := dispatch(point_args)) != 0:
            return code
    if sweep.get("plot") and not args.dry_run:
        return dispatch(parse(["plot", *map(str, folders), "--out", str(Path(sweep["out"]) / "plots")]))
    return 0
