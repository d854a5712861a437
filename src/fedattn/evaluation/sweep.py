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
from pathlib import Path

import tomllib

from fedattn.errors import FedAttnError

BENCHMARKS = ("gsm8k", "crossfacts")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the sweep's TOML file")
    parser.add_argument("--dry-run", action="store_true", help="list the points and their commands, run nothing")


def load_sweep(path: Path) -> dict:
    try:
        sweep = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FedAttnError(f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise FedAttnError(f"{path} is not valid TOML: {error}") from None
    if sweep.get("benchmark") not in BENCHMARKS:
        raise FedAttnError(f"{path}: 'benchmark' must be one of {', '.join(BENCHMARKS)}")
    if "out" not in sweep:
        raise FedAttnError(f"{path}: 'out' (the folder for the results) is required")
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


def option_words(point: dict) -> list[str]:
    """{'sync_every': 4, 'all_answers': True} -> ['--sync-every', '4', '--all-answers']"""
    words: list[str] = []
    for key, value in point.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is not False and value is not None:
            words += [flag, str(value)]
    return words


def run(args: argparse.Namespace) -> int:
    from fedattn.cli.main import build_parser, run_parsed

    sweep = load_sweep(args.config)
    folders = []
    for point in points(sweep):
        folder = point_folder(sweep, point)
        argv = ["eval", sweep["benchmark"], *option_words(point), "--out", str(folder)]
        print(("would run: fedattn " if args.dry_run else "== fedattn ") + " ".join(argv))
        folders.append(folder)
        if not args.dry_run:
            code = run_parsed(build_parser().parse_args(argv))
            if code != 0:
                return code
    if sweep.get("plot") and not args.dry_run:
        return run_parsed(
            build_parser().parse_args(["plot", *map(str, folders), "--out", str(Path(sweep["out"]) / "plots")])
        )
    return 0
