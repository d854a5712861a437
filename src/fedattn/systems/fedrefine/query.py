"""A FedRefine query from text: the receiver and its sharers loaded, the projectors of each pair
found and checked, a run with every party here.

A projector folder says which receiver and sharer it was trained for and their cache shapes; one
that does not match the models of the run is refused in one line before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedattn.errors import FedAttnError
from fedattn.report.schema import RunReport
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import answer_text, stop_rule
from fedattn.runtime.models import LoadedModel, load_model
from fedattn.systems.fedrefine import reporting
from fedattn.systems.fedrefine.caches import CacheDims, cache_dims
from fedattn.systems.fedrefine.config import RefineConfig, projector_dir
from fedattn.systems.fedrefine.inprocess import run_in_process
from fedattn.systems.fedrefine.projector import ProjectorSet, load_projectors

IN_PROCESS = "in-process"


def checked_projectors(
    directory: Path, receiver: str, receiver_dims: CacheDims, sharer: str, sharer_dims: CacheDims | None
) -> ProjectorSet:
    """The projectors in ``directory``, refused unless trained for these two models and shapes
    (``sharer_dims`` None: a remote sharer, whose shapes its frames are checked against)."""
    projectors = load_projectors(directory)
    info = projectors.info
    if (info.receiver, info.sharer) != (receiver, sharer):
        raise FedAttnError(
            f"the projector in {directory} was trained for receiver {info.receiver} and sharer {info.sharer}, "
            f"not receiver {receiver} and sharer {sharer}"
        )
    dims = info.dims
    stored_receiver = CacheDims(dims.receiver_blocks, dims.receiver_heads, dims.receiver_head_dim)
    stored_sharer = CacheDims(dims.sharer_blocks, dims.sharer_heads, dims.sharer_head_dim)
    for role, stored, actual in (("receiver", stored_receiver, receiver_dims), ("sharer", stored_sharer, sharer_dims)):
        if actual is not None and stored != actual:
            raise FedAttnError(
                f"the projector in {directory} expects a {role} cache of {_shape(stored)}; "
                f"the {role} {receiver if role == 'receiver' else sharer} has {_shape(actual)}"
            )
    return projectors


def _shape(dims: CacheDims) -> str:
    return f"{dims.blocks} blocks of {dims.heads} KV heads x {dims.head_dim}"


@dataclass
class RefineSetup:
    """The receiver and every sharer loaded, with the projectors of each pair (sharers in run order)."""

    config: RefineConfig
    receiver: LoadedModel
    sharers: list[LoadedModel]
    projectors: list[ProjectorSet]
    device: str
    dtype: str
    raw: bool = False
    split: SplitModel = field(init=False)

    def __post_init__(self) -> None:
        self.split = SplitModel(self.receiver.model)

    def model_json(self) -> dict:
        return model_json(self.receiver, [(loaded.name, loaded.identity) for loaded in self.sharers])


def model_json(receiver: LoadedModel, sharers: list[tuple[str, str]]) -> dict:
    """The report's ``model``: the receiver's name and identity, and each sharer's."""
    return {
        "name": receiver.name,
        "identity": receiver.identity,
        "sharers": [{"name": name, "identity": identity} for name, identity in sharers],
    }


def load_setup(config: RefineConfig, receiver: str, device: str, dtype: str, raw: bool, progress: bool = True):
    """Every model of the run loaded, and each pair's projectors found and checked."""
    torch_dtype = getattr(torch, dtype)
    directories = [projector_dir(receiver, spec) for spec in config.sharers]  # refused before any load
    loaded = load_model(receiver, device=device, dtype=torch_dtype, progress=progress)
    sharers = [load_model(spec.model, device=device, dtype=torch_dtype, progress=progress) for spec in config.sharers]
    projectors = [
        checked_projectors(directory, loaded.name, cache_dims(loaded.model), sharer.name, cache_dims(sharer.model)).to(
            device
        )
        for directory, sharer in zip(directories, sharers, strict=True)
    ]
    return RefineSetup(config, loaded, sharers, projectors, device, dtype, raw)


def answer_chat(setup: RefineSetup, question: str, sharers: list[int] | None = None) -> RunReport:
    """The receiver's answer to ``question`` with the sharers at ``sharers`` (indices into the run's;
    default all), every party in this process, measured and reported."""
    chosen = list(range(len(setup.sharers))) if sharers is None else sharers
    receiver = setup.receiver
    stop = stop_rule(receiver.tokenizer, receiver.model)
    taking_part = [(index, setup.sharers[index], setup.projectors[index]) for index in chosen]
    result = run_in_process(receiver, setup.split, taking_part, setup.config, question, setup.raw, stop)
    own = result.receiver
    text = answer_text(stop, receiver.tokenizer, own.answer_ids)
    parties = [*(reporting.sharer_party(sharer) for sharer in result.sharers), reporting.receiver_party(own, text)]
    timing = reporting.query_timing(own, result.wall_s, result.seconds)
    model = model_json(receiver, [(setup.sharers[i].name, setup.sharers[i].identity) for i in chosen])
    return reporting.run_report(parties, setup.config, own, model, IN_PROCESS, timing)
