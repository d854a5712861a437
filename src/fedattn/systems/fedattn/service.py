"""FedAttn as a service's query handler (``fedattn.network.service.QueryHandler``).

The model is loaded once and switched to the FedAttn attention hook for the handler's life;
a collaborator's document is read once, when its service starts. Each query's options (schedule,
codec, sparsity, decoding, ...) come from its starter as words and are read with the same parser
as ``fedattn run``'s; the model, dtype and device are the service's own, and what must match across
parties (weights, codec, ...) is checked by the protocol's handshake, as in every FedAttn run.
A party's document is its rank report (``reporting.rank_report``); the starter merges them, as
the local launcher's caller does. A collaborator's own decoded answer (``--all-answers``) stays
with it: its document carries no answer text.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from fedattn.errors import FedAttnError
from fedattn.network.grpc_transport import GrpcTransport
from fedattn.network.kv_codec import CODECS
from fedattn.network.service import SERVICE_TRANSPORT, Plan, Query
from fedattn.report.schema import merge, report_of_party
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.runtime.decoding import stop_rule
from fedattn.runtime.models import LoadedModel
from fedattn.runtime.prompting import check_context_window
from fedattn.systems.fedattn.config import run_config_from_words
from fedattn.systems.fedattn.networked import max_frame_bytes, party_segment, run_alone
from fedattn.systems.fedattn.party import Participant
from fedattn.systems.fedattn.reporting import SYSTEM, rank_report

PRIVATE_INPUT = {"question", "publisher_context"}  # what the starter's Ask carries for its own party


class FedAttnHandler:
    """One party's FedAttn: its loaded model and, for a collaborator, its own document."""

    system = SYSTEM

    def __init__(self, loaded: LoadedModel, dtype: str, context: str | None) -> None:
        self.loaded, self.dtype, self.context = loaded, dtype, context
        config = loaded.model.config
        self.max_frame_bytes = max(max_frame_bytes(config, codec) for codec in CODECS.values())
        self._hook = ExitStack()
        self._hook.enter_context(federated_attention_enabled(loaded.model))

    def close(self) -> None:
        self._hook.close()

    def plan(self, query: Query, rank: int) -> Plan:
        if rank < len(query.parties) - 1 and self.context is None:
            raise FedAttnError(f"{query.parties[rank]} serves no document: it cannot be a collaborator")
        model_config = self.loaded.model.config
        config, args = run_config_from_words(list(query.options), self.dtype, model_config.num_hidden_layers)
        return Plan(args.timeout, max_frame_bytes(model_config, config.codec), (config, args.raw))

    def run(
        self, query: Query, rank: int, plan: Plan, transport: GrpcTransport, private: dict[str, str] | None
    ) -> dict:
        config, raw = plan.settings
        world_size = len(query.parties)
        if rank == world_size - 1:
            private = private or {}
            unknown = set(private) - PRIVATE_INPUT
            if unknown:
                raise FedAttnError(f"the publisher's input has unknown parts: {', '.join(sorted(unknown))}")
            texts = (None, private.get("question"), private.get("publisher_context"))
        else:
            texts = (self.context, None, None)
        loaded = self.loaded
        segment = party_segment(loaded, rank, world_size, *texts, raw)
        check_context_window([segment], config.max_new_tokens, loaded.model.config.max_position_embeddings)
        stop = stop_rule(loaded.tokenizer, loaded.model)
        party = Participant(rank, segment, loaded.model, transport, config, stop, loaded.identity)
        start = time.perf_counter()
        run_alone(party)
        transport.flush()
        report = rank_report(loaded, party, SERVICE_TRANSPORT, transport.link_bytes_sent, time.perf_counter() - start)
        if not party.is_publisher:
            report.answer, report.answer_token_ids = None, []
            report.parties[0].answer, report.parties[0].answer_token_ids = None, None
        return report.to_json()

    def combine(self, query: Query, documents: list[dict]) -> dict:
        """The merged report, once each party's document is a report of that party alone."""
        reports = [
            report_of_party(document, SYSTEM, "FedAttn", name, rank)
            for rank, (name, document) in enumerate(zip(query.parties, documents))
        ]
        return merge(reports).to_json()
