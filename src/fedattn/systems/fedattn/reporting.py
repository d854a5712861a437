"""A FedAttn run as the one report schema (``fedattn.report.schema``).

Every FedAttn runner ends here: the in-process query (``fedattn run``, ``--json``), the evaluation
harness's records, and each networked rank (a report of its own party, which the launcher merges
with the others'). What only FedAttn has (sync blocks, tokens kept, K/V payload, FLOPs) goes into
``details``; the names the first reports used (``participants``, ``kv_codec``, ``kv_exchange``,
``all_gather_bytes_sent``) stay readable as aliases.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fedattn.report.schema import PartyReport, RunReport
from fedattn.runtime.dims import ModelDims
from fedattn.runtime.models import LoadedModel
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.costs import PartyCost, run_costs
from fedattn.systems.fedattn.inprocess import RunResult
from fedattn.systems.fedattn.party import Participant, PartyOutcome

SYSTEM = "fedattn"
ALL_GATHER = "all-gather"  # every party's K/V to every other at every sync block: the naive exchange
ALIASES = {
    "participants": "parties",
    "kv_codec": "config.kv_codec",
    "kv_exchange": "config.kv_exchange",
    "all_gather_bytes_sent": f"baselines.{ALL_GATHER}",
}


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


def setting(config: RunConfig) -> str:
    return f"{config.schedule.describe()} · K/V as {config.codec.name}"


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
    all_gather = run_costs(dims, config, [outcome.tokens for outcome in result.parties], all_answers=True)
    return RunReport(
        system=SYSTEM,
        transport=transport,
        model=model,
        config=config_json(config),
        answer=answer_texts.get(publisher),
        answer_token_ids=result.answer_token_ids,
        parties=parties,
        expected_bytes=_expected_bytes(expected),
        timing={
            "prefill_s": result.prefill_s,
            "decode_s": result.decode_s,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "wall_s": wall_s,
        },
        details=_schedule_details(config)
        | {
            "flops": {
                "prefill": sum(cost.prefill_flops for cost in expected),
                "publisher_decode": expected[-1].decode_flops(dims, max(len(result.answer_token_ids) - 1, 0)),
            },
        },
        setting=setting(config),
        baselines={ALL_GATHER: sum(cost.wire_bytes_sent for cost in all_gather)},
        aliases=ALIASES,
    )


def rank_report(
    loaded: LoadedModel, party: Participant, transport: str, link_bytes_sent: int, wall_s: float
) -> RunReport:
    """One networked rank's own view: its party alone, with what crossed its links and its wall time."""
    config, dims = party.config, ModelDims.from_config(loaded.model.config)
    cost, all_gather = (
        run_costs(dims, config, party.segment_lengths, everyone)[party.rank] for everyone in (config.all_answers, True)
    )
    answer = party.answer if party.answers else None
    text = loaded.tokenizer.decode(party.answer, skip_special_tokens=True).strip() if answer else None
    own = party_report(party.outcome(), cost, party.publisher, answer, text)
    own.link_bytes_sent = link_bytes_sent
    own.timing["wall_s"] = wall_s
    return RunReport(
        system=SYSTEM,
        transport=transport,
        model={"name": loaded.name, "identity": loaded.identity},
        config=config_json(config),
        answer=text,
        answer_token_ids=party.answer,
        parties=[own],
        expected_bytes=_expected_bytes([cost]),
        timing={"prefill_s": party.timings.prefill_s, "decode_s": party.timings.decode_s, "wall_s": wall_s},
        details=_schedule_details(config) | {"segment_lengths": party.segment_lengths},
        setting=setting(config),
        baselines={ALL_GATHER: all_gather.wire_bytes_sent},
        aliases=ALIASES,
    )


def _expected_bytes(costs: list[PartyCost]) -> dict[str, int]:
    return {
        "sent": sum(cost.wire_bytes_sent for cost in costs),
        "kv_payload_sent": sum(cost.kv_bytes_sent for cost in costs),
        "received": sum(cost.wire_bytes_received for cost in costs),
    }


def _schedule_details(config: RunConfig) -> dict[str, Any]:
    schedule = config.schedule
    return {
        "sync_layers": list(schedule.sync_layers),
        "schedule": schedule.describe(),
        "publisher_layers": list(schedule.publisher_layers),
        "publisher_sync_layers": list(schedule.publisher_sync_layers),
    }
