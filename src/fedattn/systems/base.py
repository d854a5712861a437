"""The contract through which a system plugs into the CLI and the evaluation harness.

A system (FedAttn today; SpecFed, FedSEA and FedRefine next) is a folder under ``systems/`` with a
module that implements ``System`` and is named in the registry (``fedattn.systems.SYSTEMS``). The
layers below it never name a system: the harness finds one by its name (``--system``, default
``fedattn``), and everything it reads back is the one report schema (``fedattn.report.schema``).

What a system gives:

* ``name`` and ``description``: what ``--system`` and the help call it.
* ``add_options(parser, task)``: its options, added to ``fedattn eval TASK``'s parser (model,
  schedule, decoding; and how it deals out the task's items: FedAttn's ``--split``/``--parties``
  for a public few-shot prompt, ``--mode`` for private documents). The task's ``max_new_tokens``
  is the system's default answer length.
* ``configure(args) -> setup``: the system's configuration from parsed options, validated before
  the slow part (loading models), then loaded. ``setup.device`` names where it runs.
* ``check(setup, item)``: refuse an item this setup cannot answer (a split with too few
  exemplars), before the results folder records the configuration.
* ``answer_many(setup, items) -> list[RunReport]``: answer a batch of items in this process, one
  report per item in order. Each report carries the system's answer, every party's measured
  traffic and timings, its expected costs (``expected_bytes``, from the system's cost model: the
  harness and the comparison read predicted bytes only there) and ``timing['wall_s']``, the item's
  share of the batch's wall time.
* ``run_rank(setup, rendezvous, text, question, publisher_context) -> RunReport``: run this
  process's one rank of a networked query (``fedattn participant``), from its own input alone.
* ``add_serve_options(parser)`` and ``serve_handler(args, context) -> QueryHandler``: a party that
  stays up (``fedattn serve``): its own options (model, dtype, device), then the handler its
  service hands each query to (``fedattn.network.service``), loaded once; ``context`` is the
  party's own document, read once (None for a party that only asks).
* ``add_ask_options(parser)`` and ``ask_input(args) -> (words, private)``: ``fedattn ask``'s
  options, as the query's option words every party reads and the asker's own private input.
* ``config_json(setup) -> dict``: the configuration as JSON, stored in the results folder: a
  folder holds the records of one configuration, and resuming with another is refused.
* ``describe(config, task_settings) -> Description``: what plots and the comparison need of a
  stored configuration: comparable settings named like the options, a label, and what an attacker
  sees (``Exposure``). It must read every configuration ``config_json`` ever wrote.

The harness then writes one record per item (the task's fields and scores, the RunReport) and one
summary of one shape for every (task, system): see ``fedattn.evaluation.harness``.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks.base import Item, Task
from fedattn.report.schema import RunReport

if TYPE_CHECKING:
    from fedattn.network.service import QueryHandler


KV, HIDDEN, TEXT = "kv", "hidden", "text"  # what an exposure sends (``Exposure.sent``)


@dataclass(frozen=True)
class Exposure:
    """What a curious party receives of another's private text, through ``codec``, after ``noise``:
    ``sent`` "kv", K/V at ``blocks`` (FedAttn); "hidden", the hidden states after the first
    ``blocks[0]`` blocks (FedSEA: after block A); "text", the private prompt itself (FedRefine's
    sharers read it: ``codec`` "plain", or "rephrased" in its private mode; no blocks). The noise
    is the mean absolute noise, or that many times the mean |x| of each tensor sent when
    ``relative``. An attack's recovery for exactly that (``fedattn attack``, or a ``--leakage``
    table) is the run's leakage."""

    codec: str
    blocks: tuple[int, ...]
    noise: float = 0.0
    sent: str = KV
    relative: bool = False

    def to_json(self) -> dict[str, Any]:
        """K/V exposures as before ``sent`` existed (stored summaries stay comparable)."""
        if self.sent == KV and not self.relative:
            return {"kv_codec": self.codec, "blocks": list(self.blocks), "noise": self.noise}
        return {
            "sent": self.sent,
            "codec": self.codec,
            "blocks": list(self.blocks),
            "noise": self.noise,
            "relative": self.relative,
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Exposure:
        if "kv_codec" in document:
            return cls(document["kv_codec"], tuple(document["blocks"]), float(document.get("noise", 0.0)))
        return cls(
            document["codec"],
            tuple(document["blocks"]),
            float(document["noise"]),
            document["sent"],
            bool(document["relative"]),
        )


@dataclass(frozen=True)
class Description:
    """A stored configuration as plots and the comparison read it."""

    settings: dict[str, Any]  # flat, comparable, named like the command-line options (sync_every, parties)
    label: str  # the settings that set this run apart from the system's defaults ('' when none)
    exposure: Exposure | None = None  # None: nothing private leaves its holder
    reference: bool = False  # a baseline that exchanges nothing (centralized, publisher alone)


class ServiceModule:
    """The service half of ``System`` for a system whose module ``service_module`` gives
    ``add_serve_options(parser)``, ``handler_from_args(args, context)``, ``add_ask_options(parser)``
    and ``ask_input(args)``; imported on first use, so the harness never loads the network."""

    service_module: str

    def _service(self) -> Any:
        return importlib.import_module(self.service_module)

    def add_serve_options(self, parser: argparse.ArgumentParser) -> None:
        self._service().add_serve_options(parser)

    def serve_handler(self, args: argparse.Namespace, context: str | None) -> QueryHandler:
        return self._service().handler_from_args(args, context)

    def add_ask_options(self, parser: argparse.ArgumentParser) -> None:
        self._service().add_ask_options(parser)

    def ask_input(self, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
        return self._service().ask_input(args)


def served_model(args: argparse.Namespace, context: str | None, system: str) -> tuple[Any, str]:
    """A service's one model (``--model``, ``--dtype``, ``--device``), loaded once, and its device;
    a system whose party serves a model, not a document, refuses ``--context`` in one line."""
    import torch

    from fedattn.runtime.devices import resolve_device
    from fedattn.runtime.models import load_model

    if context is not None:
        raise FedAttnError(f"a {system} party serves its model, not a document: --context is FedAttn's")
    device = resolve_device(args.device)
    return load_model(args.model, device=device, dtype=getattr(torch, args.dtype), progress=False), device


class Setup(Protocol):
    device: str


class System(Protocol):
    name: str
    description: str

    def add_options(self, parser: argparse.ArgumentParser, task: Task) -> None: ...

    def configure(self, args: argparse.Namespace) -> Setup: ...

    def check(self, setup: Setup, item: Item) -> None: ...

    def answer_many(self, setup: Setup, items: list[Item]) -> list[RunReport]: ...

    def run_rank(
        self, setup: Setup, rendezvous: Any, text: str | None, question: str | None, publisher_context: str | None
    ) -> RunReport: ...

    def add_serve_options(self, parser: argparse.ArgumentParser) -> None: ...

    def serve_handler(self, args: argparse.Namespace, context: str | None) -> QueryHandler: ...

    def add_ask_options(self, parser: argparse.ArgumentParser) -> None: ...

    def ask_input(self, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]: ...

    def config_json(self, setup: Setup) -> dict[str, Any]: ...

    def describe(self, config: dict[str, Any], task_settings: dict[str, Any]) -> Description: ...
