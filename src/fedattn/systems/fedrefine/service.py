"""FedRefine as a service's query handler (``fedattn.network.service.QueryHandler``).

A FedRefine service holds one model, loaded once, and plays the role its place in a query gives it:
in a query it is asked to join (``fedattn ask --system refine --parties S1,S2 --sharer M1
--sharer M2``) it is a **sharer** and answers the receiver's one request with its cache; in its
own queries (the asker, the last party) it is the **receiver**, with the question (its private
input, only in its own Ask), the projectors of each pair (``--sharer MODEL[:DIR]``, one per sharer
party, in order) and the fusion. A sharer asked for another model than it runs refuses the query's
Start. A party's document is its own report (``networked.own_report``); the asker merges them.
"""

from __future__ import annotations

import argparse
import time

from fedattn.argtypes import add_model_options, int_in, text_or_file
from fedattn.errors import FedAttnError
from fedattn.network.grpc_transport import GrpcTransport
from fedattn.network.service import SERVICE_TRANSPORT, Plan, Query, asker_text
from fedattn.report.schema import merge, report_of_party
from fedattn.runtime.models import LoadedModel, model_identity
from fedattn.systems.base import served_model
from fedattn.systems.fedrefine import frames
from fedattn.systems.fedrefine.config import add_run_options, config_from_args, option_words_of, query_from_words
from fedattn.systems.fedrefine.networked import (
    ReceiverSetup,
    own_party,
    own_report,
    party_frame_bytes,
    receiver_plans,
    take_part,
)
from fedattn.systems.fedrefine.reporting import SYSTEM

PRIVATE_INPUT = "prompt"  # what the asker's Ask carries for its own party (the receiver)
# the node's receive limit: a receiver's sharers, and so the size of their cache frames, are known per
# query only (each query's transport holds its own, exact limit)
NODE_FRAME_BYTES = 1 << 30


class RefineHandler:
    """One party's FedRefine: its loaded model, a sharer's or the receiver's as the query places it."""

    system = SYSTEM
    max_frame_bytes = NODE_FRAME_BYTES

    def __init__(self, loaded: LoadedModel, device: str, max_tokens: int = frames.MAX_TOKENS) -> None:
        self.loaded, self.device, self.max_tokens = loaded, device, max_tokens

    def close(self) -> None:
        """Nothing to release: queries hold no state beyond their own thread."""

    def plan(self, query: Query, rank: int) -> Plan:
        args = query_from_words(list(query.options))
        config = config_from_args(args)
        receiver = len(query.parties) - 1
        if len(config.sharers) != receiver:
            raise FedAttnError(
                f"a FedRefine query names one --sharer per sharer party: {len(config.sharers)} for {receiver}"
            )
        if rank == receiver:
            plans = receiver_plans(self.loaded, list(config.sharers), self.device)
            party = ReceiverSetup(config, self.loaded, plans, args.raw)
        else:
            asked = config.sharers[rank].model
            if model_identity(asked) != self.loaded.identity:
                raise FedAttnError(f"{query.parties[rank]} is asked for {asked}; it runs {self.loaded.name}")
            party = self.loaded
        return Plan(args.timeout, party_frame_bytes(party, config.kv_codec), (config, party))

    def run(
        self, query: Query, rank: int, plan: Plan, transport: GrpcTransport, private: dict[str, str] | None
    ) -> dict:
        config, party = plan.settings
        question = asker_text(private, PRIVATE_INPUT) if isinstance(party, ReceiverSetup) else None
        start = time.perf_counter()
        role = own_party(rank, transport, config, party, question, self.max_tokens)
        seconds = take_part(role, transport)
        return own_report(role, config, party, SERVICE_TRANSPORT, time.perf_counter() - start, seconds).to_json()

    def combine(self, query: Query, documents: list[dict]) -> dict:
        """The merged report, once every sharer's and the receiver's documents are each a FedRefine
        report of that party alone in its role."""
        roles = ["sharer"] * (len(query.parties) - 1) + ["receiver"]
        reports = [
            report_of_party(document, SYSTEM, "FedRefine", name, rank, role)
            for rank, (name, document, role) in enumerate(zip(query.parties, documents, roles, strict=True))
        ]
        return merge(reports).to_json()


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """``fedattn serve --system refine``: the model (loaded once; a sharer's, or a receiver's for its
    own queries) and the most tokens it reads for one request as a sharer."""
    add_model_options(parser)
    parser.add_argument(
        "--max-tokens",
        type=int_in(1, frames.MAX_TOKENS),
        default=frames.MAX_TOKENS,
        metavar="N",
        help=f"as a sharer, read at most N tokens per request (default {frames.MAX_TOKENS}, and the model's positions)",
    )


def handler_from_args(args: argparse.Namespace, context: str | None) -> RefineHandler:
    """The service's handler: its model loaded once."""
    loaded, device = served_model(args, context, "FedRefine")
    return RefineHandler(loaded, device, args.max_tokens)


def add_ask_options(parser: argparse.ArgumentParser) -> None:
    """``fedattn ask --system refine``: the question (it stays with the asker's own service, the
    receiver) and the query's run options: one --sharer MODEL[:DIR] per party of --parties."""
    parser.add_argument(
        "--prompt",
        required=True,
        type=text_or_file,
        metavar="TEXT|@FILE",
        help="the receiver's question (private: it goes to its own service only; sharers read it, or with "
        "--rephrase its rephrasing, as tokens)",
    )
    parser.add_argument("--raw", action="store_true", help="no chat template: the prompt is tokenized as is")
    add_run_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def ask_input(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The query's option words (every party reads them) and the asker's private question."""
    from fedattn.systems.fedsea.query import check_prompt_text

    check_prompt_text(args.prompt)
    config_from_args(args)
    return option_words_of(args), {PRIVATE_INPUT: args.prompt}
