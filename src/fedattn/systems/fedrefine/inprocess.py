"""Running FedRefine with the receiver and the sharers it asks in this process (the embedded default).

The parties share nothing but the in-process grid: each sharer holds its model, the receiver its
question, its model and the projectors; every hello, request and cache block crosses as a validated
frame, so traffic is counted exactly as over a network. Sharers the receiver does not ask are not
parties of the run (partial participation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fedattn.network.transport import InProcessGrid
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import StopRule
from fedattn.runtime.models import LoadedModel
from fedattn.systems.fedrefine import frames, protocol
from fedattn.systems.fedrefine.config import RefineConfig
from fedattn.systems.fedrefine.projector import ProjectorSet
from fedattn.systems.fedrefine.roles import Receiver, Sharer, SharerPlan

RECEIVER = "receiver"


@dataclass
class RefineResult:
    receiver: Receiver
    sharers: list[Sharer]
    seconds: dict[str, float]
    wall_s: float


def sharer_name(index: int) -> str:
    """Sharer ``index`` (0-based, in the order the run gives its sharers) is 'sharer<index + 1>'."""
    return f"sharer{index + 1}"


def run_in_process(
    receiver: LoadedModel,
    split: SplitModel,
    sharers: list[tuple[int, LoadedModel, ProjectorSet]],
    config: RefineConfig,
    question: str,
    raw: bool,
    stop: StopRule,
) -> RefineResult:
    """The receiver's answer with the sharers given as (index in the run's sharers, model, the
    pair's projectors), fused in that order; every frame over an in-process grid, measured."""
    start = time.perf_counter()
    names = [sharer_name(index) for index, _, _ in sharers] + [RECEIVER]
    grid = InProcessGrid(names, timeout=0.0)
    last = len(sharers)
    roles, plans = [], []
    for rank, (_, loaded, projectors) in enumerate(sharers):
        roles.append(Sharer(rank, last, grid.endpoint(rank), loaded, frames.MAX_TOKENS))
        plans.append(SharerPlan(rank, loaded.name, loaded.identity, projectors))
    own = Receiver(last, grid.endpoint(last), receiver, split, config, question, raw, plans, stop)
    seconds = protocol.run([*roles, own])
    if grid.pending():
        raise RuntimeError(f"{grid.pending()} frames were sent but never received: the protocol is inconsistent")
    return RefineResult(own, roles, seconds, time.perf_counter() - start)
