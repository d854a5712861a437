"""SpecFed as a ``fedattn.systems.base.System``: how the harness and the CLI drive it.

The server holds the whole prompt (SpecFed keeps models private, not prompts): a few-shot item
(GSM8K) is its raw text, exemplars then question, with no chat template, as for every system; an
item with documents is one chat prompt of the documents and the question. Each worker alone, the
draft alone and the uncompressed ensemble are configurations of the same system: one worker of
weight 1 with ``--gamma 0``, the draft model as the one worker, ``--top-k all``.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedattn.argtypes import text_or_file
from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks.base import Item, Task
from fedattn.report.schema import RunReport
from fedattn.runtime.devices import resolve_device
from fedattn.systems.base import Description
from fedattn.systems.specfed import config as specfed_config
from fedattn.systems.specfed.query import SpecFedSetup, answer, chat_prompt, load_setup, plain_prompt
from fedattn.systems.specfed.service import SpecFedHandler


class SpecFedSystem:
    name = "specfed"
    description = "SpecFed: an ensemble of workers' models decodes with the server's speculative drafts"

    def add_options(self, parser: argparse.ArgumentParser, task: Task) -> None:
        specfed_config.add_model_options(parser)
        specfed_config.add_run_options(parser)
        parser.set_defaults(max_new_tokens=task.max_new_tokens)

    def configure(self, args: argparse.Namespace) -> SpecFedSetup:
        config = specfed_config.config_from_args(args)
        return load_setup(config, resolve_device(args.device), args.dtype, raw=False)

    def check(self, setup: SpecFedSetup, item: Item) -> None:
        prompt_of(setup, item)

    def answer_many(self, setup: SpecFedSetup, items: list[Item]) -> list[RunReport]:
        """One in-process run per item (a batch shares nothing: each round waits on its own workers)."""
        return [answer(setup, prompt_of(setup, item), item.stop_texts) for item in items]

    def run_rank(self, setup: SpecFedSetup, rendezvous: Any, text: str | None, question: str | None, _: str | None):
        from fedattn.systems.specfed.networked import run_party

        return run_party(setup, rendezvous, question)

    def add_serve_options(self, parser: argparse.ArgumentParser) -> None:
        specfed_config.add_serve_options(parser)

    def serve_handler(self, args: argparse.Namespace, context: str | None) -> SpecFedHandler:
        if context is not None:
            raise FedAttnError("a SpecFed party serves its model, not a document: --context is FedAttn's")
        loaded = specfed_config.load_models([args.model], resolve_device(args.device), args.dtype, progress=False)
        return SpecFedHandler(loaded[args.model])

    def add_ask_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--prompt",
            required=True,
            type=text_or_file,
            metavar="TEXT|@FILE",
            help="the asker's prompt (private: it goes to its own service only, which is the server)",
        )
        specfed_config.add_query_options(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")

    def ask_input(self, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
        return specfed_config.option_words_of(args, specfed_config.QUERY_OPTIONS), {"prompt": args.prompt}

    def config_json(self, setup: SpecFedSetup) -> dict[str, Any]:
        return {"model": setup.model_json(), "dtype": setup.dtype, **setup.config.to_json()}

    def describe(self, config: dict[str, Any], task_settings: dict[str, Any]) -> Description:
        workers = config["workers"]
        named = dict(task_settings) | {
            "model": config["model"]["name"],
            "workers": ",".join(f"{worker['model']}:{worker['weight']:.3g}" for worker in workers),
            "draft": config["draft"],
            "gamma": config["gamma"],
            "top_k": "all" if config["top_k"] is None else config["top_k"],
            "adaptive_eps": config["adaptive_eps"],
            "reconstruct": config["reconstruct"],
            "encoding": config["encoding"],
            "temperature": config["temperature"],
            "seed": config["seed"],
            "max_new_tokens": config["max_new_tokens"],
        }
        alone = len(workers) == 1
        label = describe_label(named, alone)
        # prompts are the server's and models never leave their holders: nothing private is exposed
        return Description(named, label, None, reference=alone and config["gamma"] == 0)


def describe_label(settings: dict[str, Any], alone: bool) -> str:
    """'qwen-0.5b alone', or the ensemble's settings: 'gamma=4 top_k=64 redistribute'."""
    if alone and settings["gamma"] == 0:
        return f"{settings['workers'].rpartition(':')[0]} alone"
    parts = [f"gamma={settings['gamma']}", f"top_k={settings['top_k']}"]
    if settings["adaptive_eps"] is not None:
        parts.append(f"adaptive_eps={settings['adaptive_eps']:g}")
    if settings["top_k"] != "all":
        parts.append(settings["reconstruct"])
    if settings["encoding"] != "f32":
        parts.append(settings["encoding"])
    if settings["temperature"]:
        parts.append(f"T={settings['temperature']:g}")
    return " ".join(parts)


def prompt_of(setup: SpecFedSetup, item: Item) -> list[int]:
    """The server's prompt of an item: a few-shot item's raw text, or the documents and question as a chat."""
    text, chat = item.whole_prompt()
    return chat_prompt(setup, text) if chat else plain_prompt(setup, text)


SYSTEM = SpecFedSystem()
