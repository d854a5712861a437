"""``fedattn results upgrade DIR...``: give the result folders of an earlier fedattn the one summary shape.

Before the evaluation harness, ``fedattn eval gsm8k`` and ``fedattn eval crossfacts`` each wrote
a summary of their own (``em.publisher`` and ``bytes.mean_sent_per_query``; ``em`` and
``mean_bytes_sent``), and plots read them back through alias tables. The harness writes one shape
(``fedattn.evaluation.harness``, format 2) and plots and ``fedattn compare`` read only that, so an
earlier folder is converted once: its summary becomes format 2 (the original is kept beside it as
``summary.v1.json``). Its records keep their earlier shape, so the folder can be plotted and
compared but not resumed (a run on it is refused; evaluate into a new folder). Attack folders
(``fedattn attack``) kept their shape and need no upgrade. Running it twice changes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedattn.errors import FedAttnError
from fedattn.evaluation.harness import SUMMARY_FORMAT, described
from fedattn.evaluation.results import summary_paths
from fedattn.systems import get_system

EARLIER_SUMMARY = "summary.v1.json"
SYSTEM_KEYS = ("schedule", "sparsity", "kv_codec", "kv_exchange", "decoding", "max_new_tokens")
SCHEDULE_KEYS = ("num_layers", "sync_layers", "publisher_layers", "publisher_sync_every")


def upgraded(summary: dict[str, Any]) -> dict[str, Any]:
    """A format-1 summary of ``fedattn eval gsm8k`` or ``crossfacts`` (all FedAttn runs) in format 2."""
    config = summary["config"]
    if config.get("task") == "gsm8k-test":
        task, system, settings, rest = _gsm8k(summary)
    elif config.get("benchmark") == "crossfacts":
        task, system, settings, rest = _crossfacts(summary)
    else:
        raise FedAttnError("not a summary of fedattn eval gsm8k or crossfacts")
    return {
        "format": SUMMARY_FORMAT,
        "upgraded_from": 1,
        "task": task["name"],
        "system": "fedattn",
        "config": {"task": task, "system": system},
        "main_metric": "em",
        **described(get_system("fedattn"), system, settings),
        **rest,
    }


def _system_config(config: dict, model: dict, dtype: str, dealing: dict) -> dict:
    schedule = {key: config["schedule"][key] for key in SCHEDULE_KEYS}
    rest = {key: config[key] for key in SYSTEM_KEYS if key != "schedule"}
    return {"name": "fedattn", "model": model, "dtype": dtype, "schedule": schedule, **rest} | dealing


def _gsm8k(summary: dict) -> tuple[dict, dict, dict, dict]:
    config, em, traffic, timing = summary["config"], summary["em"], summary["bytes"], summary["time"]
    task = {
        "name": "gsm8k",
        "split": "test",
        "prompt": config["prompt"],
        "shots": config["shots"],
        "stop_texts": config["stop_texts"],
    }
    dealing = {"all_answers": config["all_answers"], "split": config["split"], "parties": config["parties"]}
    system = _system_config(config, config["model"], config["dtype"], dealing)
    metrics: dict[str, Any] = {"em": em["publisher"]}
    if len(em["parties"]) > 1:  # --every-answer
        best = em["best_collaborator"]
        metrics |= {
            "per_party": {name: {"em": value} for name, value in em["parties"].items()},
            "party_average": {"em": em["average"]},
            "best_collaborator": None if best is None else {"name": best["name"], "em": best["em"]},
        }
    count = summary["count"]
    rest = {
        "items": count,
        "metrics": metrics,
        "bytes_per_query": traffic["mean_sent_per_query"],
        "expected_bytes_per_query": traffic["mean_expected_sent_per_query"],
        "time_per_query_s": timing["total_s"] / count if count else None,
        "time": {
            "wall_s": timing["total_s"],
            "prefill_s": timing["prefill_s"],
            "decode_s": timing["decode_s"],
            "new_tokens": timing["new_tokens"],
            "tokens_per_s": timing["tokens_per_s"],
        },
        "device": summary.get("device"),
    }
    return task, system, {"shots": config["shots"]}, rest


def _crossfacts(summary: dict) -> tuple[dict, dict, dict, dict]:
    config = summary["config"]
    source = config.get("source", "crossfacts")  # CrossFacts folders had no 'source'
    guard = {key: config[key] for key in ("facts", "source", "data_sha256") if key in config}
    sizes = {key: config[key] for key in ("data_seed", "count", "parties")}
    task = {"name": source, **guard, **sizes, "scoring": config["scoring"]}
    model = {"name": config["model"]["name"], "identity": config["model"]["identity"]}
    dealing = {"all_answers": False, "mode": config["mode"], "raw": config["raw"]}
    system = _system_config(config, model, config["model"]["dtype"], dealing)
    settings = {"source": source, **{key: config[key] for key in ("facts",) if key in config}, **sizes}
    rest = {
        "items": summary["items"],
        "metrics": {"em": summary["em"], "f1": summary["f1"], "em_by_field": summary["em_by_field"]},
        "bytes_per_query": summary["mean_bytes_sent"],
        "expected_bytes_per_query": summary["mean_expected_bytes_sent"],
        "time_per_query_s": summary["mean_wall_s"],
        "time": {"wall_s": summary["total_s"]},
    }
    return task, system, settings, rest


def upgrade_folder(folder: Path) -> str:
    """Convert one folder's summary in place; what was done, in a few words."""
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FedAttnError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(summary, dict):
        raise FedAttnError(f"{path} is not a JSON object")
    if summary.get("format") == SUMMARY_FORMAT:
        return "already current"
    if "rate" in summary:
        return "an attack's folder: current"
    try:
        converted = upgraded(summary)
    except (KeyError, TypeError) as error:
        raise FedAttnError(f"{path}: not a summary fedattn wrote (lacks {error})") from None
    earlier = folder / EARLIER_SUMMARY
    if not earlier.exists():
        earlier.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(converted, indent=2, sort_keys=True), encoding="utf-8")
    temporary.replace(path)
    return f"upgraded ({converted['task']}; the earlier summary is {EARLIER_SUMMARY})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="result folders (or folders holding them)")


def run(args: argparse.Namespace) -> int:
    """Upgrade every result folder in or below the given ones, saying what became of each."""
    found = False
    for root in args.folders:
        for summary in summary_paths(root):
            found = True
            print(f"{summary.parent}: {upgrade_folder(summary.parent)}")
    if not found:
        raise FedAttnError("no summary.json in or below the given folders")
    return 0
