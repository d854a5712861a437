"""One FedRefine party as its own OS process (``fedattn refine-party``): each sharer (ranks 0..k-1, in
fusion order) holds only its own model, the receiver (rank k, the last: it starts the query) its
model, the projectors of each pair and the question; they meet over gloo or gRPC
(``network.meeting``) and go through ``protocol`` alone, each reporting its own party (the launcher
merges the reports). A service's query (``service``) runs the same pieces on its node.

The receiver never loads a sharer's model: it knows each sharer by the model its projectors were
trained for (name, and the identity ``runtime.models.model_identity`` gives it) and checks what
arrives against the shapes its projectors were trained on.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from fedattn.errors import FedAttnError
from fedattn.network.frames import kv_frame_size
from fedattn.network.kv_codec import get_codec
from fedattn.network.meeting import FederationRun, NetworkTransport, Rendezvous, links
from fedattn.network.transport import Transport
from fedattn.report.schema import RunReport
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import answer_text, stop_rule
from fedattn.runtime.models import LoadedModel, load_model, model_identity
from fedattn.systems.fedrefine import frames, protocol, reporting
from fedattn.systems.fedrefine.caches import cache_dims
from fedattn.systems.fedrefine.config import RefineConfig, SharerSpec, projector_dir
from fedattn.systems.fedrefine.inprocess import RECEIVER, sharer_name
from fedattn.systems.fedrefine.protocol import Party
from fedattn.systems.fedrefine.query import checked_projectors, model_json
from fedattn.systems.fedrefine.roles import Receiver, Sharer, SharerPlan
from fedattn.systems.phases import take_alone


def party_names(sharers: int) -> list[str]:
    """Sharer i is rank i ('sharer<i + 1>'); the receiver is the last rank."""
    return [sharer_name(index) for index in range(sharers)] + [RECEIVER]


@dataclass
class ReceiverSetup:
    """The receiver's model and, for each sharer it asks (in order), the plan it asks by."""

    config: RefineConfig
    loaded: LoadedModel
    plans: list[SharerPlan]
    raw: bool = False

    def __post_init__(self) -> None:
        self.split = SplitModel(self.loaded.model)

    def model_json(self) -> dict:
        return model_json(self.loaded, [(plan.model, plan.identity) for plan in self.plans])


def receiver_plans(loaded: LoadedModel, specs: list[SharerSpec], device: str) -> list[SharerPlan]:
    """Each sharer (rank i) by the model its projectors were trained for, its projectors checked
    against the receiver's model (and the sharer's name)."""
    plans = []
    for rank, spec in enumerate(specs):
        directory = projector_dir(loaded.name, spec)
        projectors = checked_projectors(directory, loaded.name, cache_dims(loaded.model), spec.model, None)
        plans.append(SharerPlan(rank, spec.model, model_identity(spec.model), projectors.to(device)))
    return plans


def load_receiver(config: RefineConfig, receiver: str, device: str, dtype: str, raw: bool) -> ReceiverSetup:
    loaded = load_model(receiver, device=device, dtype=getattr(torch, dtype), progress=False)
    return ReceiverSetup(config, loaded, receiver_plans(loaded, list(config.sharers), device), raw)


def max_frame_bytes(max_positions: int, heads: int, head_dim: int, codec_name: str) -> int:
    """The largest frame a peer may send: a request of the most tokens, each a longest token text,
    or one block's K/V of as many tokens (hellos and answers are far smaller)."""
    tokens = min(max_positions, frames.MAX_TOKENS)
    request = frames.REQUEST.size + tokens * (frames.PIECE_LENGTH.size + frames.MAX_PIECE)
    return max(request, kv_frame_size(tokens, True, get_codec(codec_name), heads, head_dim))


def party_frame_bytes(party: ReceiverSetup | LoadedModel, codec_name: str) -> int:
    """What this party accepts: the receiver the caches of its sharers' shapes, a sharer requests."""
    if isinstance(party, ReceiverSetup):
        limits = [
            max_frame_bytes(party.split.max_positions, plan.dims.heads, plan.dims.head_dim, codec_name)
            for plan in party.plans
        ]
        return max(limits)
    dims = cache_dims(party.model)
    return max_frame_bytes(int(party.model.config.max_position_embeddings), dims.heads, dims.head_dim, codec_name)


def check_world(config: RefineConfig, meeting: Rendezvous | FederationRun) -> list[str]:
    """The run's party names, once its size is that of its sharers and the receiver."""
    names = party_names(len(config.sharers))
    if meeting.world_size != len(names):
        raise FedAttnError(
            f"a FedRefine run of {len(config.sharers)} sharers has {len(names)} parties (the receiver last); "
            f"the run has {meeting.world_size}"
        )
    return names


def run_party(
    config: RefineConfig, party: ReceiverSetup | LoadedModel, meeting: Rendezvous | FederationRun, question: str | None
) -> RunReport:
    """Join, run this party's part of the protocol, and return its report (FedAttnError on failure).
    Once a party's part is done, a peer lost while leaving cannot change it: it warns and reports."""
    names = check_world(config, meeting)
    is_receiver = meeting.rank == len(names) - 1
    if is_receiver != isinstance(party, ReceiverSetup) or is_receiver == (question is None):
        raise FedAttnError("the receiver (the last rank) takes --prompt; a sharer takes none")
    role: Party | None = None
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    try:
        with links(meeting, names, party_frame_bytes(party, config.kv_codec)) as (transport, label):
            role = own_party(meeting.rank, transport, config, party, question)
            seconds = take_part(role, transport)
    except FedAttnError as failure:
        if role is None or not role.done:
            raise
        print(f"fedattn: warning: {failure}; this party's part was complete before, so it stands", file=sys.stderr)
    return own_report(role, config, party, label, time.perf_counter() - start, seconds)


def own_party(
    rank: int,
    transport: Transport,
    config: RefineConfig,
    party: ReceiverSetup | LoadedModel,
    question: str | None,
    max_tokens: int = frames.MAX_TOKENS,
) -> Party:
    """This process's role: the receiver (with its question) or a sharer serving up to ``max_tokens``."""
    receiver_rank = transport.world_size - 1
    if isinstance(party, ReceiverSetup):
        loaded = party.loaded
        stop = stop_rule(loaded.tokenizer, loaded.model)
        return Receiver(rank, transport, loaded, party.split, config, question, party.raw, party.plans, stop)
    return Sharer(rank, receiver_rank, transport, party, max_tokens)


def take_part(role: Party, transport: NetworkTransport) -> dict[str, float]:
    """This one party's whole protocol over its joined transport (``phases.take_alone``)."""
    return take_alone(role, transport, protocol.run, lambda party: party.done)


def own_report(
    role: Party,
    config: RefineConfig,
    party: ReceiverSetup | LoadedModel,
    label: str,
    wall_s: float,
    seconds: dict[str, float],
) -> RunReport:
    """The report of this party alone: the receiver's with its answer, times and sharers, a
    sharer's with its bytes and compute."""
    if isinstance(role, Receiver):
        text = answer_text(role.stop, role.loaded.tokenizer, role.answer_ids)
        parties = [reporting.receiver_party(role, text)]
        timing = reporting.query_timing(role, wall_s, seconds)
        report = reporting.run_report(parties, config, role, party.model_json(), label, timing)
    else:
        model = {"name": role.loaded.name, "identity": role.loaded.identity}
        report = reporting.run_report([reporting.sharer_party(role)], config, None, model, label, {"wall_s": wall_s})
    report.parties[0].link_bytes_sent = role.transport.link_bytes_sent
    return report
