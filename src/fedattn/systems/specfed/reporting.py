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


def party_cost(party: Party, config: SpecFedConfig) -> costs.PartyBytes:
    """The cost model's bytes for this party, from the rounds it saw: the server's trace holds every
    worker's kept counts, a worker's its own."""
    layout, workers = row_layout(config, party.vocab), len(config.workers)
    if isinstance(party, Server):
        drafts = [round_.drafts for round_ in party.rounds]
        kept = [round_.counts for round_ in party.rounds]
        return costs.expected_bytes(layout, len(party.prompt), drafts, workers, kept).server
    drafts = [drafts for drafts, _ in party.rounds]
    return costs.worker_bytes(layout, party.prompt_length, drafts, workers, [counts for _, counts in party.rounds])


def party_report(party: Party, config: SpecFedConfig, text: str | None) -> PartyReport:
    cost = party_cost(party, config)
    return PartyReport.of_traffic(
        party.name,
        party.rank,
        party.role,
        party.transport.stats,
        (cost.sent, cost.received),
        timing={f"{stage}_s": seconds for stage, seconds in party.seconds.items()},
        answer=text,
        answer_token_ids=list(party.answer) if isinstance(party, Server) else None,
    )


def run_report(
    parties: list[Party],
    config: SpecFedConfig,
    model: dict[str, Any],
    text: str | None,
    transport: str,
    timing: dict[str, float],
    measurement: Measurement | None = None,
) -> RunReport:
    """The run as ``parties`` saw it: all of them in-process; one networked party reports itself
    alone (``report.schema.merge`` adds the others, and the server's figures are the run's)."""
    server = next((party for party in parties if isinstance(party, Server)), None)
    reports = [party_report(party, config, text if party is server else None) for party in parties]
    details: dict[str, Any] = {}
    baselines: dict[str, int] = {}
    if server is not None:
        generated = max(len(server.answer), 1)
        stats = server.transport.stats
        details = round_figures(server.rounds, len(server.answer)) | bias_figures(measurement)
        details["bytes_per_token"] = {"up": stats.bytes_received / generated, "down": stats.bytes_sent / generated}
        drafts = [round_.drafts for round_ in server.rounds]
        layout = row_layout(config, server.vocab)
        full = costs.full_distribution_bytes(layout, len(server.prompt), drafts, len(config.workers))
        baselines[FULL_DISTRIBUTIONS] = full.total_sent
    return RunReport(
        system=SYSTEM,
        transport=transport,
        model=model,
        config=config.to_json(),
        answer=text,
        answer_token_ids=list(server.answer) if server is not None else [],
        parties=reports,
        expected_bytes={
            "sent": sum(report.expected_bytes_sent for report in reports),
            "received": sum(report.expected_bytes_received for report in reports),
        },
        timing=timing,
        details=details,
        setting=setting(config),
        baselines=baselines,
    )
