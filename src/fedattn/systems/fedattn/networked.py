"""FedAttn's networked runner: one party per process, over a transport from ``network.meeting``.

The party goes through ``protocol.PHASES`` alone, blocking on its transport where a phase waits
for a peer, and reports its own view as a ``RunReport`` with one party (the launcher merges them).
How the parties meet (gloo at a rendezvous, or gRPC with mutual TLS in a federation) and how they
leave is the network layer's (``network.meeting.links``); what remains here is FedAttn's: each
rank's own tokens, the largest frame a peer may send, and the run itself.
"""

from __future__ import annotations

import sys
import time

from fedattn.errors import FedAttnError
from fedattn.network.frames import kv_frame_size
from fedattn.network.kv_codec import KVCodec
from fedattn.network.meeting import FederationRun, Rendezvous, flush_before_failing, links
from fedattn.report.schema import RunReport
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.runtime.batch_decode import DecodeRow, decode_rows
from fedattn.runtime.decoding import stop_rule
from fedattn.runtime.dims import ModelDims
from fedattn.runtime.models import LoadedModel
from fedattn.runtime.prompting import (
    check_context_window,
    collaborator_pieces,
    publisher_pieces,
    template_for,
    tokenize_party,
)
from fedattn.systems.fedattn import protocol
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.party import Participant, party_names
from fedattn.systems.fedattn.reporting import rank_report


def own_segment(
    loaded: LoadedModel,
    rendezvous: Rendezvous | FederationRun,
    text: str | None,
    question: str | None,
    publisher_context: str | None,
    raw: bool,
) -> list[int]:
    """This party's tokens, from its own text alone (the publisher is the last rank)."""
    return party_segment(loaded, rendezvous.rank, rendezvous.world_size, text, question, publisher_context, raw)


def party_segment(
    loaded: LoadedModel,
    rank: int,
    world_size: int,
    text: str | None,
    question: str | None,
    publisher_context: str | None,
    raw: bool,
) -> list[int]:
    """Rank ``rank``'s tokens from its own text: a collaborator's context, or the publisher's (last
    rank's) question after its own optional context."""
    template = template_for(loaded.tokenizer, raw)
    if rank == world_size - 1:
        if question is None:
            raise FedAttnError(f"rank {rank} is the task publisher (the last rank): it needs --question")
        if text is not None:
            raise FedAttnError("the publisher takes --question (and --publisher-context), not --context")
        pieces = publisher_pieces(question, publisher_context, world_size == 1, template)
    else:
        if text is None or question is not None or publisher_context is not None:
            raise FedAttnError(f"rank {rank} is a collaborator: it takes exactly one --context and no --question")
        pieces = collaborator_pieces(text, rank == 0, template)
    return tokenize_party(loaded.tokenizer, pieces, f"rank {rank}")


def max_frame_bytes(model_config, codec: KVCodec) -> int:
    """The largest valid frame: K/V with explicit positions for a whole context window."""
    dims = ModelDims.from_config(model_config)
    return kv_frame_size(model_config.max_position_embeddings, False, codec, dims.num_kv_heads, dims.head_dim)


def rank_inputs(contexts: list[str], question: str, publisher_context: str | None) -> list[dict[str, str]]:
    """Each rank's own words for ``fedattn participant``, for a launcher that starts them all: a
    collaborator's context; the publisher's (last rank's) question and own context."""
    publisher = {"--question": question}
    if publisher_context is not None:
        publisher["--publisher-context"] = publisher_context
    return [{"--context": text} for text in contexts] + [publisher]


def run_party(
    loaded: LoadedModel, rendezvous: Rendezvous | FederationRun, segment: list[int], config: RunConfig
) -> RunReport:
    """Join (over gloo at a rendezvous, or over gRPC in a federation), run this party's whole
    protocol, and return its report (raises FedAttnError on failure)."""
    check_context_window([segment], config.max_new_tokens, loaded.model.config.max_position_embeddings)
    limit = max_frame_bytes(loaded.model.config, config.codec)
    party, start, wall_s = None, time.perf_counter(), None
    try:
        with links(rendezvous, party_names(rendezvous.world_size), limit) as (transport, label):
            stop = stop_rule(loaded.tokenizer, loaded.model)
            party = Participant(rendezvous.rank, segment, loaded.model, transport, config, stop, loaded.identity)
            start = time.perf_counter()
            try:
                with federated_attention_enabled(loaded.model):
                    run_alone(party)
                transport.flush()
            except FedAttnError:
                if not _answered(party):
                    flush_before_failing(transport)
                raise
            wall_s = time.perf_counter() - start  # until everything this party sent has left
    except FedAttnError as failure:
        if not _answered(party):
            raise
        # decoding needs nobody: a party (or the store's host) lost after it cannot change the answer
        print(f"fedattn: warning: {failure}; the answer was complete before, so it stands", file=sys.stderr)
    wall_s = time.perf_counter() - start if wall_s is None else wall_s
    return rank_report(loaded, party, label, transport.link_bytes_sent, wall_s)


def _answered(party: Participant | None) -> bool:
    return party is not None and party.is_publisher and bool(party.answer)


def run_alone(party: Participant) -> list[int]:
    """This party's whole run over its transport: ``protocol.PHASES`` for a query of one party.
    Returns its answer: the publisher's always, a collaborator's only with ``all_answers``."""

    def decode(rows: list[DecodeRow]) -> list[list[int]]:
        return decode_rows(
            party.model,
            rows,
            party.config.max_new_tokens,
            on_step=lambda steps: party.transport.note(f"decoding token {steps + 1}"),
        )

    protocol.run([[party]], decode)
    return party.answer
