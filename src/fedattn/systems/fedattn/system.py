"""FedAttn as a ``fedattn.systems.base.System``: how the harness and the CLI drive it.

An item becomes one token segment per party. A few-shot item (public exemplars, no documents:
GSM8K) is dealt to ``--parties`` by ``--split``, as raw text. An item with private documents
(CrossFacts, NarrativeQA) is held as ``--mode`` says: ``federated``, each collaborator its
document and the publisher the question; ``centralized``, one party all documents and the
question (the same prompt text, N = 1); ``alone``, the publisher with the question only.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from fedattn.argtypes import add_prompt_options, option_words, positive_int
from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks.base import Item, Task
from fedattn.report.schema import RunReport
from fedattn.runtime.decoding import answer_text, stop_rule
from fedattn.runtime.dims import ModelDims
from fedattn.runtime.models import LoadedModel
from fedattn.runtime.prompting import CONTEXT_SEPARATOR, build_segments, check_context_window, collaborator_pieces
from fedattn.systems.base import Description, Exposure
from fedattn.systems.fedattn import config as run_config
from fedattn.systems.fedattn import reporting
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.costs import run_costs
from fedattn.systems.fedattn.inprocess import run_many_in_process
from fedattn.systems.fedattn.networked import own_segment, run_party
from fedattn.systems.fedattn.schedule import PLACEMENTS, every, format_layers, placement
from fedattn.systems.fedattn.service import FedAttnHandler
from fedattn.systems.fedattn.splits import SPLITS, split_prompt


@dataclass(frozen=True)
class View:
    """What the parties hold in one mode: collaborators' texts, the publisher's own text, the question."""

    contexts: tuple[str, ...]
    question: str
    publisher_context: str | None = None


def federated(item: Item) -> View:
    """Each collaborator holds its document; the publisher holds only the question."""
    return View(tuple(item.documents), item.question)


def centralized(item: Item) -> View:
    """One party holds every document and the question: the same prompt text as federated, N = 1."""
    return View((), item.question, CONTEXT_SEPARATOR.join(item.documents))


def publisher_alone(item: Item) -> View:
    """The publisher without collaborators: the same question, no documents."""
    return View((), item.question)


VIEWS = {"federated": federated, "centralized": centralized, "alone": publisher_alone}
DEFAULT_PARTIES = 4  # a few-shot prompt's parties, the publisher included

# settings that describe what is exchanged: a run that exchanges nothing has none of them
EXCHANGE_SETTINGS = (
    "sync_every",
    "sync_blocks",
    "placement",
    "sync_layers",
    "publisher_layers",
    "publisher_sync_every",
    "kv_codec",
    "kv_select",
    "kv_noise",
    "kv_budget",
    "ratio_comm",
    "ratio_comm_publisher",
)
LABEL_DEFAULTS = {  # the settings a label shows when they differ from these, in this order
    "parties": None,
    "sync_every": None,
    "placement": "every",
    "sync_blocks": None,
    "sync_layers": None,
    "publisher_layers": "none",
    "publisher_sync_every": None,
    "ratio_comp": 1.0,
    "ratio_comm": 1.0,
    "kv_codec": None,
    "kv_select": "random",
    "kv_budget": None,
    "kv_noise": 0.0,
}
FLOAT_CODECS = ("float32", "bfloat16", "float16")  # lossless for a model computing in that dtype: not labelled


@dataclass
class FedAttnSetup:
    """A loaded model and the run configuration, and how items are dealt to the parties."""

    loaded: LoadedModel
    config: RunConfig
    device: str
    dtype: str
    raw: bool
    split: str | None = None  # few-shot items: dealt to ``parties`` by this split
    parties: int | None = None
    mode: str | None = None  # items with documents: who holds what


class FedAttnSystem:
    name = "fedattn"
    description = "Federated Attention: every party runs the same model over its own prompt segment"

    def add_options(self, parser: argparse.ArgumentParser, task: Task) -> None:
        run_config.add_options(parser)
        parser.set_defaults(max_new_tokens=task.max_new_tokens)
        if task.documents:
            parser.add_argument(
                "--mode", choices=tuple(VIEWS), default="federated", help="who holds what (default federated)"
            )
            return
        parser.add_argument(
            "--split", choices=SPLITS, default="TokEx", help="how the prompt is dealt to the parties (default TokEx)"
        )
        parser.add_argument(
            "--parties",
            type=positive_int,
            default=DEFAULT_PARTIES,
            metavar="N",
            help=f"parties, the publisher included; 1 = centralized (default {DEFAULT_PARTIES})",
        )
        parser.add_argument(
            "--every-answer",
            action="store_true",
            help="decode and score every participant's answer, not only the publisher's",
        )

    def configure(self, args: argparse.Namespace) -> FedAttnSetup:
        args.all_answers = args.all_answers or getattr(args, "every_answer", False)
        loaded, config, device = run_config.configure(args)
        split = getattr(args, "split", None)  # few-shot tasks only; another task's --parties is its own
        return FedAttnSetup(
            loaded,
            config,
            device,
            args.dtype,
            args.raw,
            split=split,
            parties=args.parties if split is not None else None,
            mode=getattr(args, "mode", None),
        )

    def check(self, setup: FedAttnSetup, item: Item) -> None:
        segments(setup, item)

    def answer_many(self, setup: FedAttnSetup, items: list[Item]) -> list[RunReport]:
        """One in-process run per item, every answer of the batch decoded together."""
        stop_texts = {item.stop_texts for item in items}
        if len(stop_texts) != 1:
            raise ValueError("the items of one batch must share their stop texts")
        model, tokenizer = setup.loaded.model, setup.loaded.tokenizer
        start = time.perf_counter()
        queries = [segments(setup, item) for item in items]
        for query in queries:
            check_context_window(query, setup.config.max_new_tokens, model.config.max_position_embeddings)
        stop = stop_rule(tokenizer, model, stop_texts.pop())
        results = run_many_in_process(model, queries, setup.config, stop, setup.loaded.identity)
        wall_s = (time.perf_counter() - start) / len(items)
        dims, model_json = ModelDims.from_config(model.config), _model_json(setup)
        reports = []
        for query, result in zip(queries, results):
            expected = run_costs(dims, setup.config, [len(segment) for segment in query])
            texts = {rank: answer_text(stop, tokenizer, ids) for rank, ids in result.answers.items()}
            reports.append(reporting.run_report(result, expected, dims, setup.config, model_json, texts, wall_s))
        return reports

    def run_rank(
        self,
        setup: FedAttnSetup,
        rendezvous: Any,
        text: str | None,
        question: str | None,
        publisher_context: str | None,
    ) -> RunReport:
        segment = own_segment(setup.loaded, rendezvous, text, question, publisher_context, setup.raw)
        return run_party(setup.loaded, rendezvous, segment, setup.config)

    def add_serve_options(self, parser: argparse.ArgumentParser) -> None:
        run_config.add_model_options(parser)

    def serve_handler(self, args: argparse.Namespace, context: str | None) -> FedAttnHandler:
        if context is not None:
            collaborator_pieces(context, True, None)  # an empty document is refused before the load
        loaded, _ = run_config.load_from_options(args, progress=False)
        return FedAttnHandler(loaded, args.dtype, context)

    def add_ask_options(self, parser: argparse.ArgumentParser) -> None:
        add_prompt_options(parser, question_required=True)
        run_config.add_run_options(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    def ask_input(self, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
        if args.context:
            raise FedAttnError("the asker holds the question (and --publisher-context); documents are the services'")
        words = option_words({name: getattr(args, name) for name in run_config.RUN_OPTIONS})
        private = {"question": args.question}
        if args.publisher_context is not None:
            private["publisher_context"] = args.publisher_context
        return words, private

    def config_json(self, setup: FedAttnSetup) -> dict[str, Any]:
        if setup.split is not None:
            dealing = {"split": setup.split, "parties": setup.parties}
        else:
            dealing = {"mode": setup.mode, "raw": setup.raw}
        return {"model": _model_json(setup), "dtype": setup.dtype, **reporting.config_json(setup.config), **dealing}

    def describe(self, config: dict[str, Any], task_settings: dict[str, Any]) -> Description:
        named = dict(task_settings) | _settings(config)
        reference = named.get("parties") == 1 or named.get("mode", "federated") != "federated"
        if reference:  # nothing is exchanged: no exchange settings, and the mode names the run
            named = {key: value for key, value in named.items() if key not in EXCHANGE_SETTINGS}
            named["mode"] = named.get("mode", "centralized")
            return Description(named, named["mode"], None, reference=True)
        schedule = config["schedule"]
        blocks = tuple(sorted(set(schedule["sync_layers"]) | set(schedule["publisher_layers"])))
        exposure = Exposure(config["kv_codec"], blocks, float(config["kv_exchange"]["noise"]))
        return Description(named, label(named), exposure)


def segments(setup: FedAttnSetup, item: Item) -> list[list[int]]:
    """The item's token segments, one per party, the publisher's last."""
    tokenizer = setup.loaded.tokenizer
    if setup.split is not None:
        return split_prompt(tokenizer, item.exemplars, item.question, setup.split, setup.parties)
    view = VIEWS[setup.mode](item)
    return build_segments(tokenizer, list(view.contexts), view.question, view.publisher_context, setup.raw)


def _model_json(setup: FedAttnSetup) -> dict[str, str]:
    return {"name": setup.loaded.name, "identity": setup.loaded.identity}


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration's settings, named like the options; the sync blocks as the options
    that give them (``schedule_settings``)."""
    schedule, sparsity = config["schedule"], config["sparsity"]
    exchange, decoding = config["kv_exchange"], config["decoding"]
    dealing = {key: config[key] for key in ("split", "parties", "mode", "raw") if key in config}
    return {
        "model": config["model"]["name"],
        "dtype": config["dtype"],
        **dealing,
        **schedule_settings(schedule["sync_layers"], schedule["num_layers"]),
        "publisher_layers": publisher_setting(schedule["publisher_layers"], schedule["num_layers"]),
        "publisher_sync_every": schedule["publisher_sync_every"],
        "ratio_comp": sparsity["comp"],
        "ratio_comm": sparsity["comm"],
        "ratio_comp_publisher": sparsity["comp_publisher"],
        "ratio_comm_publisher": sparsity["comm_publisher"],
        "kv_codec": config["kv_codec"],
        "kv_select": exchange["select"],
        "kv_noise": exchange["noise"],
        "kv_budget": exchange["budget"],
        "temperature": decoding["temperature"],
        "top_k": decoding["top_k"],
        "top_p": decoding["top_p"],
        "seed": decoding["seed"],
        "max_new_tokens": config["max_new_tokens"],
        "all_answers": config.get("all_answers", False),
    }


def schedule_settings(sync_layers: list[int], num_layers: int) -> dict[str, Any]:
    """The options that give these sync blocks: every H, else a placement of k blocks, else the list."""
    layers = tuple(sync_layers)
    if not layers:  # no collaborator sync (publisher-only schedules): no H, no placement
        return {"sync_blocks": 0}
    for interval in range(1, num_layers + 1):
        if every(interval, num_layers) == layers:
            return {"placement": "every", "sync_every": interval, "sync_blocks": len(layers)}
    for name in PLACEMENTS:
        if placement(name, len(layers), num_layers) == layers:
            return {"placement": name, "sync_blocks": len(layers)}
    return {"placement": "custom", "sync_layers": list(layers)}


def publisher_setting(layers: list[int], num_layers: int) -> str:
    """The publisher's receive blocks as a label: 'none', 'dense' (all), or the blocks ('12-23')."""
    if not layers:
        return "none"
    return "dense" if len(layers) == num_layers else format_layers(layers)


def label(settings: dict[str, Any]) -> str:
    """The schedule settings that differ from the defaults, e.g. 'parties=4 sync_every=8 ratio_comm=0.5'
    (a float K/V codec, lossless for its dtype, is not shown)."""
    shown = {
        key: default
        for key, default in LABEL_DEFAULTS.items()
        if not (key == "sync_blocks" and "sync_every" in settings)
    }
    if settings.get("kv_codec") in FLOAT_CODECS:
        shown["kv_codec"] = settings["kv_codec"]
    return " ".join(
        f"{key}={settings[key]}" for key, default in shown.items() if settings.get(key, default) not in (default, None)
    )


SYSTEM = FedAttnSystem()
