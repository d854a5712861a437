"""FedRefine as a ``fedattn.systems.base.System``: receivers fuse their sharers' KV caches (C2C).

The harness's side (options, configuration, answering items, the reading of a stored
configuration) is ``harness_system.HarnessMethods``; the services' side (``fedattn serve/ask
--system refine``) is ``service.py``, through ``base.ServiceModule``.
"""

from __future__ import annotations

from typing import Any

from fedattn.errors import FedAttnError
from fedattn.systems.base import ServiceModule
from fedattn.systems.fedrefine.harness_system import HarnessMethods


class RefineSystem(ServiceModule, HarnessMethods):
    service_module = "fedattn.systems.fedrefine.service"
    name = "refine"
    description = "FedRefine: sharers send their KV caches, the receiver fuses them through trained projectors (C2C)"

    def run_rank(self, setup: Any, rendezvous: Any, text: str | None, question: str | None, _: str | None):
        raise FedAttnError(
            "FedRefine's parties run one per process with `fedattn refine --transport`, not `fedattn participant`"
        )


SYSTEM = RefineSystem()
