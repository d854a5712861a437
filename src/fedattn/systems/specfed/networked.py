"""One SpecFed party as its own OS process (``fedattn specfed-party``): a worker holds only its own
model, the server its prompt and draft; they meet over gloo or gRPC (``network.meeting``) and go
through ``protocol`` alone, each reporting its own party (the launcher merges the reports).

Ranks follow ``roles.party_names``: worker r is rank r (the r-th ``--worker``), the server is last.
"""

from __future__ import annotations

import sys
import time

from fedattn.errors import FedAttnError
from fedattn.network.meeting import FederationRun, Rendezvous, flush_before_failing, links
from fedattn.report.schema import RunReport
from fedattn.runtime.decoding import stop_rule
from fedattn.runtime.prompting import real_vocabulary, tokenizer_fingerprint
from fedattn.systems.specfed import frames, protocol, reporting
from fedattn.systems.specfed.config import SpecFedConfig
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
    vocab, tokenizer = real_vocabulary(loaded.tokenizer), tokenizer_fingerprint(loaded.tokenizer)
    prompt = chat_prompt(setup, prompt_text) if is_server else []
    stop = stop_rule(loaded.tokenizer, loaded.model)
    limit = max_frame_bytes(config, vocab, loaded.model.config.max_position_embeddings)
    party: Party | None = None
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    try:
        with links(meeting, names, limit) as (transport, label):
            if is_server:
                party = Server(meeting.rank, transport, config, prompt, setup.drafter(), vocab, tokenizer, stop)
            else:
                party = Worker(meeting.rank, transport, config, loaded.model, vocab, tokenizer)
            try:
                seconds = protocol.run([party])
                transport.flush()
            except FedAttnError:
                if not _answered(party):
                    flush_before_failing(transport)
                raise
    except FedAttnError as failure:
        if not _answered(party):
            raise
        print(f"fedattn: warning: {failure}; the answer was complete before, so it stands", file=sys.stderr)
    text = stop.trim(loaded.tokenizer.decode(party.answer, skip_special_tokens=True)).strip() if is_server else None
    report = reporting.run_report(
        [party],
        config,
        setup.model_json(),
        text,
        label,
        {"wall_s": time.perf_counter() - start, **protocol.stage_times(seconds)},
    )
    report.parties[0].link_bytes_sent = transport.link_bytes_sent
    return report


def _answered(party: Party | None) -> bool:
    return isinstance(party, Server) and party.done
