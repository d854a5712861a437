"""One SpecFed party as its own OS process (``fedattn specfed-party``): a worker holds only its own
model, the server its prompt and draft; they meet over gloo or gRPC (``network.meeting``) and go
through ``protocol`` alone, each reporting its own party (the launcher merges the reports).

Ranks follow ``roles.party_names``: worker r is rank r (the r-th ``--worker``), the server is last.
"""

from __future__ import annotations

import sys
import time

from fedattn.errors import FedAttnError
from fedattn.network.meeting import FederationRun, NetworkTransport, Rendezvous, links
from fedattn.network.transport import Transport
from fedattn.report.schema import RunReport
from fedattn.runtime.decoding import StopRule, answer_text, stop_rule
from fedattn.runtime.models import LoadedModel
from fedattn.runtime.prompting import real_vocabulary, tokenizer_fingerprint
from fedattn.systems.phases import take_alone
from fedattn.systems.specfed import frames, protocol, reporting
from fedattn.systems.specfed.config import SpecFedConfig
from fedattn.systems.specfed.drafts import Drafter
from fedattn.systems.specfed.query import SpecFedSetup, chat_prompt, server_model_name
from fedattn.systems.specfed.roles import Party, Server, Worker, party_names, row_layout


def own_models(config: SpecFedConfig, rank: int) -> list[str]:
    """The one model this rank loads: its worker's, or the server's draft (under prompt lookup the
    first worker's, for its tokenizer)."""
    return [config.workers[rank].model if rank < len(config.workers) else server_model_name(config)]


def max_frame_bytes(config: SpecFedConfig, vocab: int, max_positions: int) -> int:
    """The largest frame a peer may send in this run: a server hello with a whole context window of
    prompt, or a round's records at their largest (every id of gamma + 1 positions)."""
    layout = row_layout(config, vocab)
    largest_rows = frames.rows_frame_size(
        layout, [vocab if config.top_k is None else config.top_k] * (config.gamma + 1)
    )
    return max(frames.server_hello_size(max_positions), largest_rows)


def run_party(setup: SpecFedSetup, meeting: Rendezvous | FederationRun, prompt_text: str | None) -> RunReport:
    """Join, run this party's part of the protocol, and return its report (FedAttnError on failure).
    Once the server has its whole answer a peer lost while leaving cannot change it: the server
    warns and reports."""
    config = setup.config
    names = party_names(len(config.workers))
    if meeting.world_size != len(names):
        raise FedAttnError(
            f"{len(config.workers)} workers and a server make {len(names)} parties; the run has {meeting.world_size}"
        )
    is_server = meeting.rank == len(names) - 1
    if is_server == (prompt_text is None):
        raise FedAttnError("the server (the last rank) takes --prompt; a worker takes none")
    loaded = setup.models[own_models(config, meeting.rank)[0]]
    prompt = chat_prompt(setup, prompt_text) if is_server else None
    stop = stop_rule(loaded.tokenizer, loaded.model)
    limit = max_frame_bytes(config, real_vocabulary(loaded.tokenizer), loaded.model.config.max_position_embeddings)
    party: Party | None = None
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    try:
        with links(meeting, names, limit) as (transport, label):
            drafter = setup.drafter() if is_server else None
            party = own_party(meeting.rank, transport, config, loaded, prompt, drafter, stop)
            seconds = take_part(party, transport)
    except FedAttnError as failure:
        if not answered(party):
            raise
        print(f"fedattn: warning: {failure}; the answer was complete before, so it stands", file=sys.stderr)
    return own_report(party, setup.model_json(), loaded, stop, label, time.perf_counter() - start, seconds)


def own_party(
    rank: int,
    transport: Transport,
    config: SpecFedConfig,
    loaded: LoadedModel,
    prompt: list[int] | None,
    drafter: Drafter | None,
    stop: StopRule,
) -> Party:
    """This process's party: the server (with the prompt and a drafter) or a worker of ``loaded``'s model."""
    vocab, tokenizer = real_vocabulary(loaded.tokenizer), tokenizer_fingerprint(loaded.tokenizer)
    if prompt is not None and drafter is not None:
        return Server(rank, transport, config, prompt, drafter, vocab, tokenizer, stop)
    return Worker(rank, transport, config, loaded.model, vocab, tokenizer)


def take_part(party: Party, transport: NetworkTransport) -> dict[str, float]:
    """This one party's whole protocol over its joined transport (``phases.take_alone``)."""
    return take_alone(party, transport, protocol.run, answered)


def own_report(
    party: Party, model: dict, loaded: LoadedModel, stop: StopRule, label: str, wall_s: float, seconds: dict
) -> RunReport:
    """The report of this party alone (the server's with the answer's text)."""
    is_server = isinstance(party, Server)
    text = answer_text(stop, loaded.tokenizer, party.answer) if is_server else None
    timing = {"wall_s": wall_s, **protocol.stage_times(seconds)}
    report = reporting.run_report([party], party.config, model, text, label, timing)
    report.parties[0].link_bytes_sent = party.transport.link_bytes_sent
    return report


def answered(party: Party | None) -> bool:
    """The server has its whole answer: a peer lost after that cannot change it."""
    return isinstance(party, Server) and party.done
