"""A FedRefine query as the one report schema (``fedattn.report.schema``).

Every runner ends here: the in-process query and each networked party (a report of its own party;
the launcher or the asker's service merges them). Each sharer's party reports what it sent and
received, measured at its transport, beside the cost model's bytes for its exchange; the receiver's
``sharers`` list (in ``details``) says the same of each sharer as the receiver saw it: bytes each
way (measured per peer) and predicted, tokens sent, blocks, and how long its cache took to arrive.
"""

from __future__ import annotations

from typing import Any

from fedattn.report.schema import PartyReport, RunReport
from fedattn.systems.fedrefine import costs
from fedattn.systems.fedrefine.config import RefineConfig
from fedattn.systems.fedrefine.roles import Receiver, Sharer, SharerExchange

SYSTEM = "refine"


def setting(config: RefineConfig, sharers: list[str]) -> str:
    """The configuration in a few words: 'sharers=tiny-random-wide float32 rephrase'."""
    rephrase = " rephrase" if config.rephrase else ""
    sampling = "" if config.decoding.greedy else f" T={config.decoding.temperature:g}"
    return f"sharers={','.join(sharers)} {config.kv_codec}{rephrase}{sampling}"


def sharer_party(sharer: Sharer) -> PartyReport:
    """A sharer's bytes and the cost model's for its exchange (None when it refused: a refusal's
    cost is not modelled)."""
    expected: tuple[int | None, int | None] = (None, None)
    details: dict[str, Any] = {"model": sharer.loaded.name}
    if sharer.request is not None:
        hello, request = sharer.hello, sharer.request
        predicted = costs.sharer_bytes(sharer.codec.name, hello.name, request, sharer.dims, hello.receiver_blocks)
        expected = (predicted.receiver_received, predicted.receiver_sent)
        details |= {"tokens": request.count, "blocks": len(sharer.blocks)}
    if sharer.refused is not None:
        details["refused"] = sharer.refused
    timing = {"sharer_compute_s": sharer.compute_s}
    party = PartyReport.of_traffic(sharer.name, sharer.rank, "sharer", sharer.transport.stats, expected, timing=timing)
    party.details = details
    return party


def predicted(receiver: Receiver, exchange: SharerExchange) -> costs.SharerBytes:
    plan = exchange.plan
    return costs.sharer_bytes(
        receiver.config.kv_codec, plan.model, exchange.request, plan.dims, receiver.split.num_blocks
    )


def receiver_party(receiver: Receiver, text: str | None) -> PartyReport:
    exchanges = [predicted(receiver, exchange) for exchange in receiver.exchanges]
    expected = (sum(e.receiver_sent for e in exchanges), sum(e.receiver_received for e in exchanges))
    party = PartyReport.of_traffic(
        receiver.name, receiver.rank, "receiver", receiver.transport.stats, expected, timing=receiver_timing(receiver)
    )
    party.answer = text
    party.answer_token_ids = list(receiver.answer_ids)
    party.details = {"tokens": len(receiver.prompt.ids)}
    return party


def receiver_timing(receiver: Receiver) -> dict[str, float]:
    """The receiver's own times: rephrasing, prefill, fusion, decoding, and the slowest sharer's cache."""
    seconds = dict(receiver.result.seconds) if receiver.result else {}
    if receiver.config.rephrase:
        seconds["rephrase_s"] = receiver.rephrase_s
    seconds["cache_s"] = max((exchange.cache_s for exchange in receiver.exchanges), default=0.0)
    return seconds


def sharer_entries(receiver: Receiver) -> list[dict[str, Any]]:
    """Each sharer as the receiver saw it, in fusion order."""
    entries = []
    for exchange in receiver.exchanges:
        plan, traffic = exchange.plan, receiver.transport.stats.peer(exchange.plan.rank)
        expected = predicted(receiver, exchange)
        entries.append(
            {
                "name": receiver.transport.name_of(plan.rank),
                "model": plan.model,
                "bytes_to_sharer": traffic.bytes_sent,
                "bytes_from_sharer": traffic.bytes_received,
                "expected_bytes_to_sharer": expected.receiver_sent,
                "expected_bytes_from_sharer": expected.receiver_received,
                "tokens": exchange.request.count,
                "blocks": len(exchange.cache.blocks),
                "same_tokenizer": exchange.same_tokenizer,
                "cache_s": exchange.cache_s,
            }
        )
    return entries


def run_report(
    parties: list[PartyReport],
    config: RefineConfig,
    receiver: Receiver | None,
    model: dict[str, Any],
    transport: str,
    timing: dict[str, float],
) -> RunReport:
    """The query (``receiver``: its own role, when this process holds it) as one report;
    ``parties`` may be one sharer's alone (a networked sharer's own report, merged later)."""
    by_role = {party.role: party for party in parties}
    own = by_role.get("receiver")
    expected = {
        "sent": sum(party.expected_bytes_sent or 0 for party in parties),
        "received": sum(party.expected_bytes_received or 0 for party in parties),
    }
    details: dict[str, Any] = {"kv_codec": config.kv_codec}
    names = [spec.model for spec in config.sharers]
    if receiver is not None:
        details |= {"sharers": sharer_entries(receiver), "rephrasing": receiver.rephrasing}
        names = [exchange.plan.model for exchange in receiver.exchanges]
    return RunReport(
        system=SYSTEM,
        transport=transport,
        model=model,
        config=config.to_json(),
        answer=own.answer if own else None,
        answer_token_ids=(own.answer_token_ids or []) if own else [],
        parties=parties,
        expected_bytes=expected,
        timing=timing,
        details=details,
        setting=setting(config, names),
    )


def query_timing(receiver: Receiver, wall_s: float, seconds: dict[str, float]) -> dict[str, float]:
    """The query's times: wall, the receiver's own, and the handshake."""
    return {"wall_s": wall_s, **receiver_timing(receiver), "handshake_s": seconds.get("handshake", 0.0)}
