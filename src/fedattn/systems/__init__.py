"""The systems by name: ``--system NAME`` and a summary's ``system`` find their implementation here.

Each entry names the module whose ``SYSTEM`` implements ``fedattn.systems.base.System``; it is
imported on first use, so listing a system costs nothing and the layers below never import one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedattn.errors import FedAttnError

if TYPE_CHECKING:
    from fedattn.systems.base import System

SYSTEMS = {
    "fedattn": "fedattn.systems.fedattn.system",
    "specfed": "fedattn.systems.specfed.system",
    "split": "fedattn.systems.fedsea.system",
    "refine": "fedattn.systems.fedrefine.system",
}
DEFAULT_SYSTEM = "fedattn"


def get_system(name: str) -> System:
    if name not in SYSTEMS:
        raise FedAttnError(f"unknown system {name!r}; choose one of {', '.join(SYSTEMS)}")
    return importlib.import_module(SYSTEMS[name]).SYSTEM
