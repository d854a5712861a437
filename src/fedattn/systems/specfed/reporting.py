"""A SpecFed run as the one report schema (``fedattn.report.schema``).

Every runner ends here: the in-process query, the evaluation harness's records and each networked
party (a report of its own party; the launcher merges them). The run-level figures the issue names
(rounds, accepted tokens, acceptance rate, tokens per round, aggregation bias, bytes per generated
token up and down) go into ``details``, so ``--json`` has them at its top level; the cost model's
prediction goes beside the measured bytes, and full distributions, the uncompressed way of sending
the same rounds, are the baseline.
"""

from __future__ import annotations

from statistics import fmean
from typing import Any

from fedattn.report.schema import PartyReport, RunReport
from fedattn.systems.specfed import costs
from fedattn.systems.specfed.config import SpecFedConfig
from fedattn.systems.specfed.inprocess import Measurement
from fedattn.systems.specfed.roles import Party, Round, Server, row_layout

SYSTEM = "specfed"
FULL_DISTRIBUTIONS = "full distributions"  # the same rounds with every probability sent (f32)


def setting(config: SpecFedConfig) -> str:
    """The configuration in a few words: 'gamma=4 top_k=64 redistribute f32'."""
    sent = "all" if config.top_k is None else str(config.top_k)
    adaptive = f" adaptive_eps={config.adaptive_eps:g}" if config.adaptive_eps is not None else ""
    sampling = f" T={config.temperature:g}" if not config.greedy else ""
    rounds = f"draft={config.draft} gamma={config.gamma} top_k={sent}{adaptive}"
    return f"{rounds} {config.reconstruct} {config.encoding}{sampling}"


def round_figures(rounds: list[Round], answer_length: int) -> dict[str, Any]:
    """Acceptance rate (accepted drafts over drafts proposed) and tokens per round."""
    drafted = sum(round_.drafts for round_ in rounds)
    accepted = sum(round_.accepted for round_ in rounds)
    return {
        "rounds": len(rounds),
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "tokens_per_round": answer_length / len(rounds) if rounds else 0.0,
    }


def bias_figures(measurement: Measurement | None) -> dict[str, float | None]:
    """Means over the positions scored (in-process runs only: a deployment never sees the truth)."""
    if measurement is None or not measurement.aggregation_bias:
        return {"aggregation_bias": None, "residual_mass": None, "acceptance_bias": None}
    return {
        "aggregation_bias": fmean(measurement.aggregation_bias),
        "residual_mass": fmean(measurement.residual_mass),
        "acceptance_bias": fmean(measurement.acceptance_bias) if measurement.acceptance_bias else None,
    }


def expected(server: Server, workers: int, config: SpecFedConfig) -> costs.RunCost:
    """The cost model's bytes for the rounds the server saw (its trace: drafts, kept counts)."""
    return costs.run_cost(
        prompt_length=len(server.prompt),
        drafts=[round_.drafts for round_ in server.rounds],
        counts=[round_.counts for round_ in server.rounds],
        layout=row_layout(config, server.vocab),
        workers=workers,
    )


def party_report(
    party: Party, cost: costs.PartyBytes | None, answer: list[int] | None, text: str | None
) -> PartyReport:
    stats = party.transport.stats
    return PartyReport(
        name=party.name,
        rank=party.rank,
        role=party.role,
        bytes_sent=stats.bytes_sent,
        bytes_received=stats.bytes_received,
        frames_sent=stats.frames_sent,
        frames_received=stats.frames_received,
        expected_bytes_sent=None if cost is None else cost.sent,
        expected_bytes_received=None if cost is None else cost.received,
        timing={f"{stage}_s": seconds for stage, seconds in party.seconds.items()},
        answer=text,
        answer_token_ids=answer,
    )


def run_report(
    server: Server,
    parties: list[Party],
    config: SpecFedConfig,
    model: dict[str, Any],
    text: str,
    transport: str,
    timing: dict[str, float],
    measurement: Measurement | None = None,
) -> RunReport:
    """The run as the server saw it, with the parties given (all of them in-process; a networked
    party reports itself alone, and ``merge`` adds the others)."""
    cost = expected(server, len(config.workers), config) if isinstance(parties[-1], Server) else None
    reports = [
        party_report(
            party,
            None if cost is None else cost.parties[party.rank],
            server.answer if party is server else None,
            text if party is server else None,
        )
        for party in parties
    ]
    generated = max(len(server.answer), 1)
    details = round_figures(server.rounds, len(server.answer)) | bias_figures(measurement)
    if cost is not None:
        details["bytes_per_token"] = {"up": cost.up / generated, "down": cost.down / generated}
    return RunReport(
        system=SYSTEM,
        transport=transport,
        model=model,
        config=config.to_json(),
        answer=text,
        answer_token_ids=list(server.answer),
        parties=reports,
        expected_bytes={} if cost is None else {"sent": cost.sent, "received": cost.received},
        timing=timing,
        details=details,
        setting=setting(config),
        baselines={} if cost is None else {FULL_DISTRIBUTIONS: cost.full_distributions_sent},
    )
