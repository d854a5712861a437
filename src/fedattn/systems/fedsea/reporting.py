"""A FedSEA run as the one report schema (``fedattn.report.schema``).

Every runner ends here: the in-process query, the evaluation harness's records and each networked
party (a report of its own party; the launcher merges them). What the issue names beyond the
shared fields (the client's blocks, its share of compute and memory, per-token timing, bytes per
token each way, how the server batched) goes into ``details``; the cost model's prediction goes
beside the measured bytes, and recomputing the prefix every step (FL-GLM) is the baseline.
"""

from __future__ import annotations

from typing import Any

from fedattn.network.kv_codec import codec_by_code
from fedattn.report.schema import PartyReport, RunReport
from fedattn.systems.fedsea import costs
from fedattn.systems.fedsea.config import SplitConfig
from fedattn.systems.fedsea.roles import Client, Server, Session

SYSTEM = "split"
RECOMPUTE = "recompute the prefix every step (FL-GLM)"


def setting(config: SplitConfig) -> str:
    """The configuration in a few words: 'A,C=2,2 noise=0.02 float32'."""
    first, last = config.client_blocks
    noise = "" if config.noise.off else f" noise={config.noise.describe()}"
    reply = "" if config.reply_noise.off else f" reply_noise={config.reply_noise.level:g}"
    sampling = "" if config.decoding.greedy else f" T={config.decoding.temperature:g}"
    return f"A,C={first},{last}{noise}{reply} {config.hidden_codec}{sampling}"


def client_party(client: Client) -> PartyReport:
    expected = costs.session_bytes(
        client.config.hidden_codec, client.split.hidden_size, len(client.prompt), len(client.answer)
    )
    sent, received = expected.client_sent, expected.client_received
    party = PartyReport.of_traffic(
        client.name, client.rank, "client", client.transport.stats, (sent, received), timing=client.timing()
    )
    party.answer_token_ids = list(client.answer)
    return party


def server_party(server: Server) -> PartyReport:
    """The server's bytes, and the cost model's for the sessions its clients ended (None when one
    was refused or dropped: what a bad frame costs is not modelled)."""
    sent = received = None
    if not server.refused and not server.sessions:
        sessions = [_session_bytes(server, session) for session in server.closed]
        sent = sum(session.client_received for session in sessions)
        received = sum(session.client_sent for session in sessions)
    timing = {"server_compute_s": server.compute_s}
    party = PartyReport.of_traffic(
        server.name, server.rank, "server", server.transport.stats, (sent, received), timing=timing
    )
    party.details = batching(server)
    return party


def session_party(server: Server, client: Client, share: float) -> PartyReport:
    """The server as one of several clients' runs sees it: the bytes it exchanged with that client
    (measured per peer at its transport), the cost model's for that client's session (None when the
    session was refused or dropped), and ``share`` of its compute (the client's part of the batch)."""
    session = next((session for session in server.closed if session.client == client.rank), None)
    sent = received = None
    if session is not None:
        expected = _session_bytes(server, session)
        sent, received = expected.client_received, expected.client_sent
    traffic = server.transport.stats.peer(client.rank)
    timing = {"server_compute_s": server.compute_s * share}
    party = PartyReport.of_traffic(server.name, server.rank, "server", traffic, (sent, received), timing=timing)
    party.details = batching(server)
    return party


def batching(server: Server) -> dict[str, int]:
    """How the server batched its clients' steps: engine calls, and the most steps in one."""
    return {"batches": len(server.trace), "largest_batch": max((len(b.clients) for b in server.trace), default=0)}


def run_report(
    parties: list[PartyReport],
    config: SplitConfig,
    client: Client | None,
    model: dict[str, Any],
    text: str | None,
    transport: str,
    timing: dict[str, float],
    share: dict[str, float],
) -> RunReport:
    """The run of one client (``client``: its own role, when this process holds it) and the server;
    ``parties`` may be the server's alone (a networked server's own report, merged later)."""
    by_role = {party.role: party for party in parties}
    client_report = by_role.get("client")
    answer = (client_report.answer_token_ids or []) if client_report else []
    expected = {
        "sent": sum(party.expected_bytes_sent or 0 for party in parties),
        "received": sum(party.expected_bytes_received or 0 for party in parties),
    }
    generated = max(len(answer), 1)
    details = {
        "client_blocks": list(config.client_blocks),
        "noise": config.noise.level,
        "noise_relative": config.noise.relative,
        "reply_noise": config.reply_noise.level,
        "hidden_codec": config.hidden_codec,
        "client_share": share,
    }
    if client_report:
        details["bytes_per_token"] = {
            "up": client_report.bytes_sent / generated,
            "down": client_report.bytes_received / generated,
        }
    baselines = {}
    if client is not None:
        width, prompt_length = client.split.hidden_size, len(client.prompt)
        baselines[RECOMPUTE] = costs.recompute_bytes(config.hidden_codec, width, prompt_length, len(answer))
    if "server" in by_role:
        details["server_batches"] = by_role["server"].details.get("batches")
    return RunReport(
        system=SYSTEM,
        transport=transport,
        model=model,
        config=config.to_json(),
        answer=text,
        answer_token_ids=answer,
        parties=parties,
        expected_bytes=expected,
        timing=timing,
        details=details,
        setting=setting(config),
        baselines=baselines,
    )


def client_timing(client: Client, wall_s: float, seconds: dict[str, float]) -> dict[str, float]:
    """A client's times: the run's wall time, its prefill and per-token times, its handshake."""
    return {"wall_s": wall_s, **client.timing(), "handshake_s": seconds.get("handshake", 0.0)}


def _session_bytes(server: Server, session: Session) -> costs.SessionBytes:
    """The cost model's bytes of a session its client ended, from what the server saw of it."""
    codec = codec_by_code(session.codec_code).name
    return costs.session_bytes(codec, server.split.hidden_size, session.prompt_length, session.answer_length)
