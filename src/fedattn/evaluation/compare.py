"""``fedattn compare RESULTS... [--attack DIR]... [--out FILE]``: one Markdown table across systems.

Every result folder's summary has the harness's one shape, whichever system wrote it, so the
comparison is a loop over folders: one table per task, one row per (system, setting), and the
same columns for every system: the task's main metric, bytes per query (sent by all parties
together, measured), wall time per query, and leakage. A run's leakage is what a ``fedattn attack``
folder (K/V) or a ``--leakage`` table (any attack, e.g. on FedSEA's hidden states) measured for
what the run sends, through its codec, at its blocks and noise (the best block, as in ``fedattn
plot``); a baseline that sends nothing leaks nothing, a run that sends the prompt as text (FedRefine's
sharers read it) says so, and a run no attack covered says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedattn.argtypes import existing_path, output_file
from fedattn.evaluation.plots import (
    Recovery,
    Result,
    add_leakage_argument,
    exposure_text,
    leakage,
    load_command_results,
    read_leakage_sources,
)
from fedattn.report.render import format_bytes
from fedattn.systems.base import TEXT

COLUMNS = ("system", "setting", "model", "items", "{metric}", "bytes / query", "time / query", "leakage")


def comparison(results: list[Result], recoveries: list[Recovery]) -> str:
    """The Markdown document: a heading and a table per task, tasks in name order."""
    tasks = sorted({result.summary["task"] for result in results})
    parts = [
        "# Comparison across systems",
        "",
        f"Written by `fedattn compare` from {len(results)} result folders. Quality is the task's main metric; "
        "bytes are sent per query by all parties together (measured); time is wall time per query; leakage "
        "is the share of a party's private tokens an attack (`fedattn attack`, or a `--leakage` table) recovered "
        "from what the run sends.",
    ]
    for task in tasks:
        rows = table([result for result in results if result.summary["task"] == task], recoveries)
        parts += ["", f"## {task}", "", *rows]
    return "\n".join(parts) + "\n"


def table(results: list[Result], recoveries: list[Recovery]) -> list[str]:
    """One task's rows, by system and then by bytes per query."""
    metric = results[0].summary["main_metric"]
    rows = sorted(results, key=lambda result: (result.summary["system"], result.get("bytes_per_query") or 0))
    labels = [f"{result.summary['system']}: {result.label}" for result in rows]
    header = [column.format(metric=metric) for column in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for result, label in zip(rows, labels):
        setting = result.label if labels.count(label) == 1 else f"{result.label} ({result.folder.name})"
        cells = [
            result.summary["system"],
            setting,
            str(result.settings.get("model", "")),
            str(result.summary["items"]),
            _percent(result.get(metric)),
            format_bytes(result.get("bytes_per_query") or 0),
            f"{result.get('time_per_query_s') or 0:.2f} s",
            leakage_cell(result, recoveries),
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines


def leakage_cell(result: Result, recoveries: list[Recovery]) -> str:
    """The measured recovery; or what is exposed where no attack applies (nothing, or a prompt sent as text)."""
    exposure = result.summary.get("exposure")
    if exposure is None or exposure.get("sent") == TEXT:
        return exposure_text(exposure)
    worst = leakage(result, recoveries)
    return "not measured" if worst is None else f"{worst[0]:.1%} (block {worst[1]})"


def _percent(value: object) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "n/a"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results", nargs="+", type=existing_path, metavar="RESULTS", help="result folders (or folders holding them)"
    )
    parser.add_argument(
        "--attack",
        type=Path,
        action="append",
        metavar="DIR",
        help="a `fedattn attack` folder (repeat for other codecs): fills the leakage column",
    )
    add_leakage_argument(parser)
    parser.add_argument("--out", type=output_file, metavar="FILE", help="write the Markdown here (default: print it)")


def run(args: argparse.Namespace) -> int:
    results = load_command_results(args.results)
    document = comparison(results, read_leakage_sources(args.attack, args.leakage))
    if args.out is None:
        sys.stdout.write(document)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0
