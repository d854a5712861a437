"""FedSEA-LLaMA (split inference) as a ``fedattn.systems.base.System``: how the harness and the CLI drive it.

The client holds the whole prompt (FedSEA keeps the prompt from the server by sending only hidden
states): a few-shot item (GSM8K) is its raw text, exemplars then question, with no chat template;
an item with documents is one chat prompt of the documents and the question
(``Item.whole_prompt``, as for SpecFed's server). A batch of items is a batch of clients: every
item is one client of one in-process server, which runs their pending steps together, as a
service batches its sessions; each item's report carries its own client's traffic and the
server's side of that session. What the server sees is the hidden states after block A, noised
and encoded as the options say: the description's ``Exposure``.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedattn.argtypes import add_model_options
from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks.base import Item, Task
from fedattn.report.schema import RunReport
from fedattn.runtime.devices import resolve_device
from fedattn.systems.base import HIDDEN, Description, Exposure, ServiceModule
from fedattn.systems.fedsea import config as split_config
from fedattn.systems.fedsea.query import SplitSetup, answer_many, chat_prompt, load_setup, plain_prompt

# settings a label shows when they differ from these (client_blocks always), in this order
LABEL_DEFAULTS = {"reply_noise": 0.0, "hidden_codec": split_config.DEFAULT_HIDDEN_CODEC, "temperature": 0.0}


class SplitSystem(ServiceModule):
    service_module = "fedattn.systems.fedsea.service"
    name = "split"
    description = (
        "FedSEA-LLaMA: split inference, the client runs the first A and last C blocks, "
        "the server the middle on (noised) hidden states"
    )

    def add_options(self, parser: argparse.ArgumentParser, task: Task) -> None:
        add_model_options(parser)
        split_config.add_run_options(parser)
        parser.set_defaults(max_new_tokens=task.max_new_tokens)

    def configure(self, args: argparse.Namespace) -> SplitSetup:
        config = split_config.config_from_args(args)
        config.check_served()  # A + C against the model's depth is checked once it is loaded
        return load_setup(config, args.model, resolve_device(args.device), args.dtype, raw=False)

    def check(self, setup: SplitSetup, item: Item) -> None:
        prompt_of(setup, item)

    def answer_many(self, setup: SplitSetup, items: list[Item]) -> list[RunReport]:
        """Every item as one client of one server, their steps batched there; one report per item."""
        return answer_many(setup, [(prompt_of(setup, item), item.stop_texts) for item in items])

    def run_rank(self, setup: SplitSetup, rendezvous: Any, text: str | None, question: str | None, _: str | None):
        raise FedAttnError(
            "the split system's parties run one per process with `fedattn split --transport`, not `fedattn participant`"
        )

    def config_json(self, setup: SplitSetup) -> dict[str, Any]:
        return {"model": setup.model_json(), "dtype": setup.dtype, **setup.config.to_json()}

    def describe(self, config: dict[str, Any], task_settings: dict[str, Any]) -> Description:
        noise, reply, decoding = config["noise"], config["reply_noise"], config["decoding"]
        first, last = config["client_blocks"]
        named = dict(task_settings) | {
            "model": config["model"]["name"],
            "dtype": config["dtype"],
            "client_blocks": f"{first},{last}",
            **noise_settings(noise["level"], noise["relative"]),
            "reply_noise": reply["level"],
            "hidden_codec": config["hidden_codec"],
            "temperature": decoding["temperature"],
            "top_k": decoding["top_k"],
            "top_p": decoding["top_p"],
            "seed": decoding["seed"],
            "max_new_tokens": config["max_new_tokens"],
        }
        level = float(noise["level"])
        exposure = Exposure(config["hidden_codec"], (first,), level, HIDDEN, bool(noise["relative"]) and level > 0)
        return Description(named, label(named), exposure)


def noise_settings(level: float, relative: bool) -> dict[str, float | None]:
    """The noise as the option that set it (``noise`` or ``noise_relative``, the other None); a run
    without noise has both 0, so it belongs to a sweep of either."""
    if level == 0:
        return {"noise": 0.0, "noise_relative": 0.0}
    return {"noise": None, "noise_relative": level} if relative else {"noise": level, "noise_relative": None}


def label(settings: dict[str, Any]) -> str:
    """'client_blocks=2,2 noise_relative=0.5', and any other setting away from its default."""
    parts = [f"client_blocks={settings['client_blocks']}"]
    for key in ("noise", "noise_relative"):
        if settings[key]:
            parts.append(f"{key}={settings[key]:g}")
    parts += [f"{key}={settings[key]}" for key, default in LABEL_DEFAULTS.items() if settings[key] != default]
    return " ".join(parts)


def prompt_of(setup: SplitSetup, item: Item) -> list[int]:
    """The client's prompt of an item: a few-shot item's raw text, or the documents and question as a chat."""
    text, chat = item.whole_prompt()
    return chat_prompt(setup, text) if chat else plain_prompt(setup, text)


SYSTEM = SplitSystem()
