"""One FedSEA party as its own OS process (``fedattn split-party``): the server (rank 0) holds only
what it runs for the client, the client (rank 1) its prompt; they meet over gloo or gRPC
(``network.meeting``) and go through ``protocol`` alone, each reporting its own party (the
launcher merges the reports). A service's query (``service``) runs the same pieces on its node.
"""

from __future__ import annotations

import sys
import time

from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import get_codec
from fedattn.network.meeting import FederationRun, NetworkTransport, Rendezvous, links
from fedattn.network.transport import Transport
from fedattn.report.schema import RunReport
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import answer_text, stop_rule
from fedattn.systems.fedsea import frames, protocol, reporting
from fedattn.systems.fedsea.config import MAX_CLIENT_BLOCKS
from fedattn.systems.fedsea.inprocess import party_names
from fedattn.systems.fedsea.protocol import Party
from fedattn.systems.fedsea.query import SplitSetup, chat_prompt
from fedattn.systems.fedsea.roles import Client, Engine, Server
from fedattn.systems.phases import take_alone

SERVER_RANK, CLIENT_RANK = 0, 1


def max_frame_bytes(split: SplitModel, codec_name: str) -> int:
    """The largest frame a peer may send: a whole context window of hidden states with their
    positions (the hello, the answer and done are far smaller)."""
    return frames.hidden_size(get_codec(codec_name), split.max_positions, split.hidden_size, True)


def run_party(
    setup: SplitSetup, meeting: Rendezvous | FederationRun, prompt_text: str | None, limit: int = MAX_CLIENT_BLOCKS
) -> RunReport:
    """Join, run this party's part of the protocol, and return its report (FedAttnError on failure).
    ``limit`` is the server's on A and C; both parties refuse a split beyond it alike, before they
    meet. Once a party's part is done, a peer lost while leaving cannot change it: it warns and reports."""
    names = party_names(1)
    if meeting.world_size != len(names):
        raise FedAttnError(
            f"a FedSEA run is a server (rank 0) and one client (rank 1); the run has {meeting.world_size} parties"
        )
    is_client = meeting.rank == CLIENT_RANK
    if is_client == (prompt_text is None):
        raise FedAttnError("the client (rank 1) takes --prompt; the server (rank 0) takes none")
    setup.config.check(setup.split.num_blocks, limit)
    prompt = chat_prompt(setup, prompt_text) if is_client else None
    party: Party | None = None
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    try:
        with links(meeting, names, max_frame_bytes(setup.split, setup.config.hidden_codec)) as (transport, label):
            party = own_party(meeting.rank, transport, setup, prompt, limit)
            seconds = take_part(party, transport)
    except FedAttnError as failure:
        if party is None or not party.done:
            raise
        print(f"fedattn: warning: {failure}; this party's part was complete before, so it stands", file=sys.stderr)
    return own_report(party, setup, label, time.perf_counter() - start, seconds)


def own_party(
    rank: int,
    transport: Transport,
    setup: SplitSetup,
    prompt: list[int] | None,
    limit: int = MAX_CLIENT_BLOCKS,
    engine: Engine | None = None,
) -> Party:
    """This process's party: the client (rank 1, with its prompt) or the server (rank 0) of one
    client, serving A and C up to ``limit`` and running its steps with ``engine``."""
    loaded = setup.loaded
    if rank == CLIENT_RANK and prompt is not None:
        stop = stop_rule(loaded.tokenizer, loaded.model)
        return Client(rank, SERVER_RANK, transport, setup.split, setup.config, prompt, stop, loaded.identity)
    # the local server of ``fedattn split`` is the user's own: the noise seed, if given, seeds its replies too
    seed = setup.config.noise_seed
    return Server(rank, transport, setup.split, [CLIENT_RANK], loaded.identity, limit, seed, engine=engine)


def take_part(party: Party, transport: NetworkTransport) -> dict[str, float]:
    """This one party's whole protocol over its joined transport (``phases.take_alone``)."""
    return take_alone(party, transport, protocol.run, lambda role: role.done)


def own_report(party: Party, setup: SplitSetup, label: str, wall_s: float, seconds: dict[str, float]) -> RunReport:
    """The report of this party alone: the client's with its answer and times, the server's with
    its sessions' bytes and batches."""
    if isinstance(party, Client):
        text = answer_text(party.stop, setup.loaded.tokenizer, party.answer)
        parties, timing = [reporting.client_party(party)], reporting.client_timing(party, wall_s, seconds)
        client = party
    else:
        parties, timing, text, client = [reporting.server_party(party)], {"wall_s": wall_s}, None, None
    report = reporting.run_report(parties, setup.config, client, setup.model_json(), text, label, timing, setup.share())
    report.parties[0].link_bytes_sent = party.transport.link_bytes_sent
    return report
