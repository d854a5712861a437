"""FedRefine as a ``fedattn.systems.base.System``: receivers fuse their sharers' KV caches (C2C).

The harness's side (options, configuration, answering items, the reading of a stored
configuration) is ``harness_system.HarnessMethods``; a networked rank and the services are not
here yet.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from fedattn.errors import FedAttnError
from fedattn.systems.fedrefine.harness_system import HarnessMethods

if TYPE_CHECKING:
    from fedattn.network.service import QueryHandler

NOT_YET = "FedRefine's {what} is not yet available; evaluate it in-process with `fedattn eval mc --system refine`"


class RefineSystem(HarnessMethods):
    name = "refine"
    description = "FedRefine: sharers send their KV caches, the receiver fuses them through trained projectors (C2C)"

    def run_rank(self, setup: Any, rendezvous: Any, text: str | None, question: str | None, _: str | None):
        raise FedAttnError(NOT_YET.format(what="networked party"))

    def add_serve_options(self, parser: argparse.ArgumentParser) -> None:
        raise FedAttnError(NOT_YET.format(what="service"))

    def serve_handler(self, args: argparse.Namespace, context: str | None) -> QueryHandler:
        raise FedAttnError(NOT_YET.format(what="service"))

    def add_ask_options(self, parser: argparse.ArgumentParser) -> None:
        raise FedAttnError(NOT_YET.format(what="service"))

    def ask_input(self, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
        raise FedAttnError(NOT_YET.format(what="service"))


SYSTEM = RefineSystem()
