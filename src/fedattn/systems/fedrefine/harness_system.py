"""What FedRefine gives the evaluation harness (``fedattn eval TASK --system refine``): its options,
configuration, answers and the reading of a stored configuration (``systems.base``).

The options name one configuration of the comparison, so one harness covers every baseline:
``--receiver`` alone (no ``--sharer``); a sharer alone is ``--receiver <the sharer's model>`` with no
sharers; ``--sharer NAME[:PROJECTOR_DIR]`` (repeatable, fused in the order given) with ``--exchange
cache`` is C2C fusion, with ``--exchange text`` C2C's text-to-text baseline (each sharer writes a
hint of up to ``--hint-tokens``); ``--rephrase`` puts the receiver's own rewrite of the question in
its place for everything that follows, the sharers' reading included. See ``harness_query``.

Exposure: a sharer reads the receiver's prompt in clear (it must run its model over it), or in the
private mode the receiver's rephrasing of it; what comes back (K/V of that text, or a hint) is
nothing of the receiver's beyond it. That is neither FedAttn's K/V nor FedSEA's hidden states, so
it is an ``Exposure`` of its own kind (``sent`` "text", codec "plain" or "rephrased", no blocks):
no token-recovery attack measures it (recovery of a plain prompt is all of it), and the comparison
says what is sent instead of a rate.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedattn.argtypes import add_placement_options, positive_int
from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks.base import Item, Task
from fedattn.report.schema import RunReport
from fedattn.runtime.devices import resolve_device
from fedattn.systems.base import TEXT, Description, Exposure
from fedattn.systems.fedrefine import harness_query as query
from fedattn.systems.fedrefine.config import add_fusion_options


class HarnessMethods:
    """The harness's side of the ``refine`` system (its services are elsewhere)."""

    def add_options(self, parser: argparse.ArgumentParser, task: Task) -> None:
        parser.add_argument(
            "--receiver",
            default=query.DEFAULT_RECEIVER,
            help=f"the model that answers (default {query.DEFAULT_RECEIVER}); without --sharer it answers alone, "
            "so a sharer alone is --receiver <the sharer's model>",
        )
        add_fusion_options(parser)
        parser.add_argument(
            "--exchange",
            choices=query.EXCHANGES,
            default=query.CACHE,
            help="cache: C2C fusion of the sharers' K/V (default); text: each sharer writes a hint the receiver reads",
        )
        parser.add_argument(
            "--hint-tokens",
            type=positive_int,
            default=query.DEFAULT_HINT_TOKENS,
            metavar="N",
            help=f"the most tokens of a sharer's hint with --exchange text (default {query.DEFAULT_HINT_TOKENS})",
        )
        parser.add_argument("--max-new-tokens", type=positive_int, default=task.max_new_tokens)
        add_placement_options(parser)

    def configure(self, args: argparse.Namespace) -> query.RefineEvalSetup:
        config = query.RefineEvalConfig(
            receiver=args.receiver,
            sharers=tuple(args.sharer),
            exchange=args.exchange,
            hint_tokens=args.hint_tokens,
            rephrase=args.rephrase,
            kv_codec=args.kv_codec,
            max_new_tokens=args.max_new_tokens,
        )
        return query.load_setup(config, resolve_device(args.device), args.dtype, progress=not args.json)

    def check(self, setup: query.RefineEvalSetup, item: Item) -> None:
        if item.documents or item.exemplars:
            raise FedAttnError(
                "FedRefine answers one chat message: a task with documents or few-shot exemplars is not one"
            )

    def answer_many(self, setup: query.RefineEvalSetup, items: list[Item]) -> list[RunReport]:
        """Each item on its own, in order (the wall time of each is its own)."""
        return [query.answer_item(setup, item.question, item.bare_question) for item in items]

    def config_json(self, setup: query.RefineEvalSetup) -> dict[str, Any]:
        projectors = setup.projectors_json()
        return {"model": setup.model_json(), "dtype": setup.dtype, **setup.config.to_json(), "projectors": projectors}

    def describe(self, config: dict[str, Any], task_settings: dict[str, Any]) -> Description:
        sharers = [word.split(":", 1)[0] for word in config["sharers"]]
        named = dict(task_settings) | {
            "model": config["receiver"],
            "receiver": config["receiver"],
            "sharers": ",".join(sharers),
            "exchange": config["exchange"] if sharers else None,
            "hint_tokens": config["hint_tokens"],
            "rephrase": config["rephrase"],
            "kv_codec": config["kv_codec"],
            "dtype": config["dtype"],
            "max_new_tokens": config["max_new_tokens"],
        }
        exposure = Exposure("rephrased" if config["rephrase"] else "plain", (), sent=TEXT) if sharers else None
        return Description(named, query.label(config), exposure, reference=not sharers)
