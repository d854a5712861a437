"""A FedAttn run as the one report schema (``fedattn.report.schema``).

Every FedAttn runner ends here: the in-process query (``fedattn run``, ``--json``), the evaluation
harness's records, and (per rank) the networked party. What only FedAttn has (sync blocks,
tokens kept, K/V payload, FLOPs) goes into ``details``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fedattn.report.schema import PartyReport, RunReport
from fedattn.runtime.dims import ModelDims
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.costs import PartyCost
from fedattn.systems.fedattn.inprocess import PartyReport as PartyOutcome
from fedattn.systems.fedattn.inprocess import RunResult

SYSTEM = "fedattn"


def config_json(config: RunConfig) -> dict[str, Any]:
    """The settings every party agreed on, as JSON reads them back (tuples as lists)."""
    schedule = config.schedule
    return {
        "schedule": asdict(schedule)
        | {
            "sync_layers": list(schedule.sync_layers),
            "publisher_layers": list(schedule.publisher_layers),
        },
        "sparsity": asdict(config.sparsity),
        "kv_codec": config.codec.name,
        "kv_exchange": asdict(config.exchange),
        "decoding": asdict(config.decoding),
        "max_new_tokens": config.max_new_tokens,
        "all_answers": config.all_answers,
    }


def party_report(
    outcome: PartyOutcome, cost: PartyCost, publisher_rank: int, answer: list[int] | None, text: str | None
) -> PartyReport:
    return PartyReport(
        name=outcome.name,
        rank=outcome.rank,
        role="publisher" if outcome.rank == publisher_rank else "collaborator",
        bytes_sent=outcome.bytes_sent,
        bytes_received=outcome.bytes_received,
        frames_sent=outcome.frames_sent,
        frames_received=outcome.frames_received,
        expected_bytes_sent=cost.wire_bytes_sent,
        expected_bytes_received=cost.wire_bytes_received,
        timing={"prefill_s": outcome.prefill_s, "decode_s": outcome.decode_s, "wait_s": outcome.wait_s},
        answer=text,
        answer_token_ids=answer,
        details={
            "tokens": outcome.tokens,
            "kept_tokens": outcome.kept_tokens,
            "kv_payload_sent": outcome.kv_payload_sent,
            "expected_kv_bytes_sent": cost.kv_bytes_sent,
            "expected_kv_bytes_received": cost.kv_bytes_received,
            "prefill_flops": cost.prefill_flops,
            "generated_tokens": outcome.generated_tokens,
            "block_wait_s": {str(layer): seconds for layer, seconds in sorted(outcome.block_wait_s.items())},
        },
    )


def run_report(
    result: RunResult,
    expected: list[PartyCost],
    dims: ModelDims,
    config: RunConfig,
    model: dict[str, Any],
    answer_texts: dict[int, str],
    wall_s: float,
    transport: str = "inprocess",
) -> RunReport:
    """The report of one in-process query (every party's outcome and predicted cost)."""
    publisher = len(result.parties) - 1
    parties = [
        party_report(outcome, cost, publisher, result.answers.get(outcome.rank), answer_texts.get(outcome.rank))
        for outcome, cost in zip(result.parties, expected)
    ]
    schedule = config.schedule
    return RunReport(
        system=SYSTEM,
        transport=transport,
        model=model,
        config=config_json(config),
        answer=answer_texts.get(publisher),
        answer_token_ids=result.answer_token_ids,
        parties=parties,
        expected_bytes={
            "sent": sum(cost.wire_bytes_sent for cost in expected),
            "kv_payload_sent": sum(cost.kv_bytes_sent for cost in expected),
            "received": sum(cost.wire_bytes_received for cost in expected),
        },
        timing={
            "prefill_s": result.prefill_s,
            "decode_s": result.decode_s,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "wall_s": wall_s,
        },
        details={
            "sync_layers": list(schedule.sync_layers),
            "schedule": schedule.describe(),
            "publisher_layers": list(schedule.publisher_layers),
            "publisher_sync_layers": list(schedule.publisher_sync_layers),
            "flops": {
                "prefill": sum(cost.prefill_flops for cost in expected),
                "publisher_decode": expected[-1].decode_flops(dims, max(len(result.answer_token_ids) - 1, 0)),
            },
        },
    )
