"""SpecFed as a service's query handler (``fedattn.network.service.QueryHandler``).

A SpecFed service holds one model, loaded once, and plays the role its place in a query gives it:
in a query it is asked to join (any rank but the last) it is a **worker** of its own model; in its
own queries (the asker, last) it is the **server**, whose model drafts (or, under ``--draft
lookup``, only tokenizes the prompt). Nobody chooses another party's model: the server knows the
workers by name only, and each worker's tokenizer is checked against the server's at the handshake
(``roles.check_tokenizer``), as is everything all parties must agree on (weights by rank, round
settings: ``SpecFedConfig.fingerprint``). The query's settings come from the asker as words; its
prompt only in the asker's own Ask (``private``), never to another service.

A party's document is its own report (``networked.own_report``, as a ``fedattn specfed-party``
writes); the asker merges them, naming every worker's model as its document says.
"""

from __future__ import annotations

import time

from fedattn.errors import FedAttnError, ProtocolError
from fedattn.network.grpc_transport import GrpcTransport
from fedattn.network.service import SERVICE_TRANSPORT, Plan, Query, asker_text
from fedattn.report.schema import RunReport, merge, report_of_party
from fedattn.runtime.decoding import stop_rule
from fedattn.runtime.models import LoadedModel
from fedattn.runtime.prompting import check_prompt_length, real_vocabulary
from fedattn.systems.specfed.config import (
    ENCODINGS,
    LOOKUP_DRAFT,
    SpecFedConfig,
    query_config,
    query_from_words,
)
from fedattn.systems.specfed.networked import max_frame_bytes, own_party, own_report, take_part
from fedattn.systems.specfed.query import new_drafter, template_prompt
from fedattn.systems.specfed.reporting import SYSTEM

PRIVATE_INPUT = "prompt"  # what the asker's Ask carries for its own party (the server)
MAX_GAMMA = 32  # drafts per round a service accepts: it bounds the largest frame its node takes


class SpecFedHandler:
    """One party's SpecFed: its loaded model, a worker's or the server's as the query places it."""

    system = SYSTEM

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.vocab = real_vocabulary(loaded.tokenizer)
        self.positions = loaded.model.config.max_position_embeddings
        self.max_frame_bytes = max(max_frame_bytes(config, self.vocab, self.positions) for config in self._largest())

    def close(self) -> None:
        """Nothing to undo: the model is only read."""

    def plan(self, query: Query, rank: int) -> Plan:
        args = query_from_words(list(query.options))
        if args.gamma > MAX_GAMMA:
            raise FedAttnError(f"--gamma {args.gamma}: a service takes at most {MAX_GAMMA} drafts per round")
        config = query_config(args, len(query.parties) - 1, rank, self.loaded.name)
        return Plan(args.timeout, max_frame_bytes(config, self.vocab, self.positions), (config, args.raw))

    def run(
        self, query: Query, rank: int, plan: Plan, transport: GrpcTransport, private: dict[str, str] | None
    ) -> dict:
        config, raw = plan.settings
        loaded = self.loaded
        is_server = rank == len(query.parties) - 1
        prompt = self._prompt(config, raw, private) if is_server else None
        drafter = new_drafter(config, loaded) if is_server else None
        stop = stop_rule(loaded.tokenizer, loaded.model)
        start = time.perf_counter()
        party = own_party(rank, transport, config, loaded, prompt, drafter, stop)
        seconds = take_part(party, transport)
        model = self._model_json(config, is_server)
        return own_report(party, model, loaded, stop, SERVICE_TRANSPORT, time.perf_counter() - start, seconds).to_json()

    def combine(self, query: Query, documents: list[dict]) -> dict:
        """The merged report, once each party's document is a SpecFed report of that party alone in
        its role; the workers' models as their documents name them."""
        reports = [
            _own_report(name, rank, len(query.parties), document)
            for rank, (name, document) in enumerate(zip(query.parties, documents, strict=True))
        ]
        *workers, server = reports
        merged = merge(reports)
        weights = [worker["weight"] for worker in server.config["workers"]]
        named = [{**_named(report), "weight": weight} for report, weight in zip(workers, weights, strict=True)]
        merged.model = {"name": "+".join(worker["name"] for worker in named), "workers": named, "draft": server.model}
        merged.config = server.config | {
            "workers": [{"model": worker["name"], "weight": worker["weight"]} for worker in named]
        }
        return merged.to_json()

    def _prompt(self, config: SpecFedConfig, raw: bool, private: dict[str, str] | None) -> list[int]:
        """The asker's prompt in its model's chat template, fitting its positions with the answer."""
        prompt = template_prompt(self.loaded, asker_text(private, PRIVATE_INPUT), raw)
        check_prompt_length(len(prompt), config.max_new_tokens, self.positions)
        return prompt

    def _model_json(self, config: SpecFedConfig, is_server: bool) -> dict:
        """This party's model as its report names it: a worker's own, or the server's draft (none
        under prompt lookup, as in every SpecFed report)."""
        if is_server and config.draft == LOOKUP_DRAFT:
            return {"name": LOOKUP_DRAFT, "identity": None}
        return {"name": self.loaded.name, "identity": self.loaded.identity}

    def _largest(self) -> list[SpecFedConfig]:
        """The settings of a query's largest frames: every id of MAX_GAMMA + 1 positions, in each
        encoding, with and without ids and residuals (the node's receive limit)."""
        return [
            SpecFedConfig((), LOOKUP_DRAFT, MAX_GAMMA, top_k, eps, "redistribute", encoding, 0.0, 0, 1)
            for encoding in ENCODINGS
            for top_k, eps in ((None, None), (self.vocab, 0.5))
        ]


def _own_report(name: str, rank: int, world_size: int, document: dict) -> RunReport:
    """``document`` read as the report of ``name`` alone, at ``rank`` in its role, naming its model
    (ProtocolError if not)."""
    role = "server" if rank == world_size - 1 else "worker"
    report = report_of_party(document, SYSTEM, "SpecFed", name, rank, role)
    _named(report)
    return report


def _named(report: RunReport) -> dict:
    """A party's model as its report names it: {"name": text, "identity": text or None}."""
    model, name = report.model, report.parties[0].name
    if (
        not isinstance(model, dict)
        or set(model) != {"name", "identity"}
        or not isinstance(model["name"], str)
        or not isinstance(model["identity"], (str, type(None)))
    ):
        raise ProtocolError(f"{name}'s report does not name its model")
    return {"name": model["name"][:200], "identity": model["identity"] and model["identity"][:200]}
