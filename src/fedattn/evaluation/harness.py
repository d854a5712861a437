"""One resumable evaluation harness over (task, system, configuration).

The loop (``pending`` and ``run_batches``) knows only units with a key, a results store and a
function that turns a batch of units into records: ``fedattn eval`` runs it over a task's items
answered by a system, ``fedattn attack`` over (block, noise) points, ``fedattn eval drift`` over
prompts. Every record is appended as soon as its batch is done, so an interrupted run resumes
where it stopped, and a resumed run skips what the folder already holds.

``evaluate(task, args)`` is ``fedattn eval TASK --system NAME``: the task gives the items and the
scoring (``fedattn.evaluation.tasks.base``), the system answers a batch of items with one
``RunReport`` each (``fedattn.systems.base``). The folder's configuration is
``{"task": {"name", ...}, "system": {"name", ...}}``. A record holds the item's fields, ``answer``,
``scores`` (the task's scores of it), ``party_scores`` and ``answered_by`` when several parties
answered, ``batch_size`` and ``report`` (the RunReport's JSON). The summary has one shape for
every task and system (``SUMMARY_FORMAT``)::

    task, system, config, items, main_metric, metrics    the task's scores averaged (and per party)
    settings, setting, reference, exposure               the system's reading of its configuration
    bytes_per_query, expected_bytes_per_query            measured and predicted, sent over all parties
    time_per_query_s, time                               wall time per item; totals per phase
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from statistics import mean
from typing import Any, Protocol, TypeVar

from fedattn.argtypes import positive_int
from fedattn.errors import FedAttnError
from fedattn.evaluation.results import ResultStore, read_config
from fedattn.evaluation.tasks.base import Item, Task, TaskRun
from fedattn.report.render import format_bytes, progress_bar
from fedattn.report.schema import RunReport
from fedattn.systems import DEFAULT_SYSTEM, SYSTEMS, get_system
from fedattn.systems.base import System

SUMMARY_FORMAT = 2  # 1: the per-task summaries before the harness (``fedattn results upgrade`` converts them)
Unit = TypeVar("Unit")


class Store(Protocol):
    def done_keys(self) -> set[str]: ...

    def append(self, record: dict) -> None: ...


def pending(store: Store, units: Sequence[Unit], key: Callable[[Unit], str]) -> list[Unit]:
    """The units the store holds no record of, in order."""
    done = store.done_keys()
    return [unit for unit in units if key(unit) not in done]


def run_batches(
    store: Store,
    todo: list[Unit],
    work: Callable[[list[Unit]], list[dict]],
    batch_size: int,
    label: str,
    total: int,
    quiet: bool = False,
) -> None:
    """``work`` on ``todo`` a batch at a time, each batch's records stored before the next starts;
    the progress bar counts ``total`` units, those done before this run included."""
    with progress_bar(label, total, completed=total - len(todo), quiet=quiet) as advance:
        for first in range(0, len(todo), batch_size):
            batch = todo[first : first + batch_size]
            for record in work(batch):
                store.append(record)
            advance(len(batch))


# -- fedattn eval TASK ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, task: Task, system: str = DEFAULT_SYSTEM) -> None:
    """The task's options, those of ``system`` and the harness's. Two systems' options may clash
    (both have --model), so a parser holds one system's: the CLI builds it for the system its words
    name with ``--system NAME`` (the default system when they name none)."""
    task.add_options(parser)
    parser.add_argument(
        "--system",
        choices=tuple(SYSTEMS),
        default=system,
        help=f"who answers (default {DEFAULT_SYSTEM}); the system options here are {system}'s, "
        "and --system NAME gives NAME's instead",
    )
    get_system(system).add_options(parser, task)
    try:
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    except argparse.ArgumentError:  # the system's own options have it (FedAttn's, for ``fedattn run``)
        pass
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="records, summary and configuration; rerun to resume"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=task.batch_size,
        metavar="B",
        help=f"items answered together (default {task.batch_size})",
    )


def evaluate(task: Task, args: argparse.Namespace) -> int:
    """Answer and score the items not yet in --out, write the summary, print it; 0 on success."""
    run = task.prepare(args)
    refuse_earlier_format(args.out)
    system = get_system(args.system)
    setup = system.configure(args)
    if run.items:  # refuse what the system cannot answer before the folder records the configuration
        system.check(setup, run.items[0])
    config = {"task": {"name": run.name, **run.config}, "system": {"name": system.name, **system.config_json(setup)}}
    with ResultStore(args.out, config) as store:
        todo = pending(store, run.items, lambda item: item.key)
        label = f"{run.title} · {system.name} on {setup.device}"
        answer = partial(answer_records, run, system, setup)
        run_batches(store, todo, answer, args.batch_size, label, len(run.items), quiet=args.json)
        summary = summarize(run, system, config, store.records()) | {"device": setup.device}
        path = store.write_summary(summary)
    if args.json:
        print(json.dumps(summary | {"config": config, "summary_path": str(path)}, indent=2))
    else:
        print(summary_line(summary, run, path))
    return 0


def refuse_earlier_format(directory: Path) -> None:
    """A folder of an earlier fedattn cannot take new records (their shapes differ): say what to do."""
    previous = read_config(directory)
    if previous is not None and not isinstance(previous.get("system"), dict):
        raise FedAttnError(
            f"{directory} holds results of an earlier fedattn, which cannot be resumed: choose another --out "
            f"(`fedattn results upgrade {directory}` converts its summary for plots and comparisons)"
        )


def answer_records(run: TaskRun, system: System, setup: Any, items: list[Item]) -> list[dict]:
    """A batch of items answered by the system, each scored: their records."""
    reports = system.answer_many(setup, items)
    return [item_record(run, item, report, len(items)) for item, report in zip(items, reports)]


def item_record(run: TaskRun, item: Item, report: RunReport, batch_size: int) -> dict:
    answer = report.answer or ""
    record = {"key": item.key, **item.fields}
    record |= {"answer": answer, "scores": run.score(item, answer), "batch_size": batch_size}
    answering = [party for party in report.parties if party.answer is not None]
    if len(answering) > 1:
        record["party_scores"] = {party.name: run.score(item, party.answer) for party in answering}
        record["answered_by"] = next(party.name for party in reversed(answering) if party.answer == report.answer)
    return record | {"report": report.to_json()}


# -- the summary ---------------------------------------------------------------------------------
def summarize(run: TaskRun, system: System, config: dict, records: list[dict]) -> dict:
    """The one summary shape (see the module docstring) over every record in the folder."""
    reports = [RunReport.from_json(record["report"]) for record in records]
    expected = [report.expected_bytes.get("sent") for report in reports]
    wall = [report.timing.get("wall_s", 0.0) for report in reports]
    return {
        "format": SUMMARY_FORMAT,
        "task": run.name,
        "system": system.name,
        "config": config,
        "items": len(records),
        "main_metric": run.main_metric,
        "metrics": mean_scores([record["scores"] for record in records])
        | party_metrics(records, run.main_metric)
        | run.extra_metrics(records),
        **described(system, config["system"], run.settings),
        "bytes_per_query": _mean([report.measured_bytes["sent"] for report in reports]),
        "expected_bytes_per_query": None if None in expected else _mean(expected),
        "time_per_query_s": _mean(wall),
        "time": time_totals(reports),
    }


def described(system: System, system_config: dict, task_settings: dict) -> dict[str, Any]:
    """The summary's reading of a configuration: settings, label, whether a baseline, exposure."""
    description = system.describe(system_config, task_settings)
    return {
        "settings": description.settings,
        "setting": description.label,
        "reference": description.reference,
        "exposure": None if description.exposure is None else description.exposure.to_json(),
    }


def mean_scores(scores: list[dict]) -> dict[str, float]:
    """The mean of every numeric score (a bool counts as 0 or 1), in the scorer's order."""
    names = [name for name, value in (scores[0] if scores else {}).items() if _is_score(value)]
    return {name: mean(float(entry[name]) for entry in scores) for name in names}


def party_metrics(records: list[dict], main_metric: str) -> dict[str, Any]:
    """Where several parties answered: each one's mean scores ('per_party'), their average
    ('party_average'), and the best of the parties other than the one whose answer is the run's
    ('best_collaborator')."""
    scored = [record for record in records if "party_scores" in record]
    if not scored:
        return {}
    names = list(dict.fromkeys(name for record in scored for name in record["party_scores"]))
    parties = {
        name: mean_scores([record["party_scores"][name] for record in scored if name in record["party_scores"]])
        for name in names
    }
    answerers = {record["answered_by"] for record in scored}
    others = {name: scores[main_metric] for name, scores in parties.items() if name not in answerers}
    best = max(others, key=others.__getitem__, default=None)
    return {
        "per_party": parties,
        "party_average": {main_metric: mean(scores[main_metric] for scores in parties.values())},
        "best_collaborator": None if best is None else {"name": best, main_metric: others[best]},
    }


def time_totals(reports: list[RunReport]) -> dict[str, float]:
    """Seconds per phase summed over the items, the answers' tokens, and the decoding rate."""
    totals: dict[str, float] = {}
    for report in reports:
        for key, value in report.timing.items():
            if key.endswith("_s"):
                totals[key] = totals.get(key, 0.0) + value
    new_tokens = sum(
        len(party.answer_token_ids) for report in reports for party in report.parties if party.answer is not None
    )
    decode_s = totals.get("decode_s", 0.0)
    return totals | {"new_tokens": new_tokens, "tokens_per_s": new_tokens / decode_s if decode_s > 0 else 0.0}


def summary_line(summary: dict, run: TaskRun, path: Path) -> str:
    """The summary as one paragraph for a person."""
    metrics, main = summary["metrics"], summary["main_metric"]
    ordered = [main] + [name for name, value in metrics.items() if name != main and _is_score(value)]
    scores = ", ".join(f"{name.upper()} {metrics[name]:.1%}" for name in ordered if name in metrics)
    setting = " ".join(part for part in (summary["system"], summary["setting"]) if part)
    text = f"{run.title}, {setting}: {scores} over {summary['items']} {run.unit}"
    best = metrics.get("best_collaborator")
    if best is not None:
        average = metrics["party_average"][main]
        text += f"; average over all parties {average:.1%}, best collaborator {best['name']} {best[main]:.1%}"
    expected = summary["expected_bytes_per_query"]
    timing = summary["time"]
    return text + (
        f". Per query {format_bytes(summary['bytes_per_query'] or 0)} sent"
        + ("" if expected is None else f" (cost model {format_bytes(expected)})")
        + f", {summary['time_per_query_s'] or 0:.2f} s; {timing.get('wall_s', 0.0):.1f} s in all, "
        f"{timing['tokens_per_s']:.1f} new tokens/s while decoding. Summary: {path}"
    )


def _mean(values: list[float]) -> float | None:
    return mean(values) if values else None


def _is_score(value: Any) -> bool:
    """A number to average (a bool counts as 0 or 1)."""
    return isinstance(value, (int, float))
