"""FedRefine (Cache-to-Cache fusion) as a ``fedattn.systems.base.System``: how the CLI's services
drive it. The evaluation harness's part (``add_options``, ``configure``, ``check``,
``answer_many``, ``config_json``, ``describe``) is not in this build yet: each says so in one line.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks.base import Item, Task
from fedattn.systems.base import Description, ServiceModule


def _not_yet(what: str) -> NoReturn:
    raise FedAttnError(f"FedRefine's {what} is not in this build yet: use `fedattn refine`")


class RefineSystem(ServiceModule):
    service_module = "fedattn.systems.fedrefine.service"
    name = "refine"
    description = "FedRefine: sharers send their KV caches, the receiver fuses them through trained projectors (C2C)"

    def add_options(self, parser: argparse.ArgumentParser, task: Task) -> None:
        _not_yet("evaluation")

    def configure(self, args: argparse.Namespace) -> Any:
        _not_yet("evaluation")

    def check(self, setup: Any, item: Item) -> None:
        _not_yet("evaluation")

    def answer_many(self, setup: Any, items: list[Item]) -> list:
        _not_yet("evaluation")

    def run_rank(self, setup: Any, rendezvous: Any, text: str | None, question: str | None, _: str | None):
        raise FedAttnError(
            "FedRefine's parties run one per process with `fedattn refine --transport`, not `fedattn participant`"
        )

    def config_json(self, setup: Any) -> dict[str, Any]:
        _not_yet("evaluation")

    def describe(self, config: dict[str, Any], task_settings: dict[str, Any]) -> Description:
        _not_yet("evaluation")


SYSTEM = RefineSystem()
