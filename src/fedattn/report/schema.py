"""One report for one run, whoever produced it and whichever system ran.

The in-process runner, each networked party and the launcher that merges them all emit a
``RunReport``; the CLI prints it, ``--json`` dumps it, the evaluation harness keeps one in every
record, and plots and the cross-system comparison read it back. Fields every system shares are
fields; what only one system has (FedAttn's sync blocks, SpecFed's acceptance rate) goes in
``details`` and is written at the top level of the JSON, so a reader never needs to know which
system wrote a document to find its traffic, timing or answer.

A system that renamed a key may keep the old name for its readers (``aliases``: old top-level
name -> where the value now is, e.g. FedAttn's ``participants`` -> ``parties``); the document
lists them under ``aliases`` and reading it back drops the copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from fedattn.errors import FedAttnError, ProtocolError

SCHEMA_VERSION = 1


@dataclass
class PartyReport:
    """One party's view: what it sent and received (measured at its transport), what the cost
    model predicted for it, and its time per phase."""

    name: str
    rank: int
    role: str
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    expected_bytes_sent: int | None = None
    expected_bytes_received: int | None = None
    link_bytes_sent: int | None = None  # networked only: one copy per addressee plus framing
    timing: dict[str, float] = field(default_factory=dict)  # e.g. prefill_s, decode_s, wait_s, wall_s
    answer: str | None = None
    answer_token_ids: list[int] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_traffic(cls, name: str, rank: int, role: str, traffic: Any, expected: tuple[int | None, int | None], **rest):
        """A party's report from the traffic its transport counted (bytes and frames each way:
        ``network.transport.TrafficStats``) and the cost model's ``expected`` (sent, received)."""
        return cls(
            name=name,
            rank=rank,
            role=role,
            bytes_sent=traffic.bytes_sent,
            bytes_received=traffic.bytes_received,
            frames_sent=traffic.frames_sent,
            frames_received=traffic.frames_received,
            expected_bytes_sent=expected[0],
            expected_bytes_received=expected[1],
            **rest,
        )

    def to_json(self) -> dict[str, Any]:
        """Flat: the timings sit beside the byte counts (``party["prefill_s"]``)."""
        document = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("timing", "details")}
        _merge_unique(document, self.timing, f"party {self.name}")
        _merge_unique(document, self.details, f"party {self.name}")
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> PartyReport:
        known = {f.name for f in fields(cls)} - {"timing", "details"}
        missing = {"name", "rank", "role"} - set(document)
        if missing:
            raise FedAttnError(f"a party report lacks {', '.join(sorted(missing))}")
        rest = {key: value for key, value in document.items() if key not in known}
        timing = {key: value for key, value in rest.items() if _is_timing(key, value)}
        details = {key: value for key, value in rest.items() if key not in timing}
        return cls(**{key: document[key] for key in known if key in document}, timing=timing, details=details)


@dataclass
class RunReport:
    """One run (one query) of one system: the answer, every party, traffic measured and
    predicted, timings and the configuration that produced it."""

    system: str
    transport: str
    model: dict[str, Any]  # name, identity (and more, for systems with several models)
    config: dict[str, Any]
    answer: str | None
    answer_token_ids: list[int]
    parties: list[PartyReport]
    expected_bytes: dict[str, int] = field(default_factory=dict)  # sent, received (whole run)
    timing: dict[str, float] = field(default_factory=dict)  # wall_s, and per phase
    details: dict[str, Any] = field(default_factory=dict)
    setting: str = ""  # the configuration in a few words, for titles and comparison rows
    # bytes other ways of answering the same query would send, by name: the yardsticks of savings
    baselines: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # old name -> dotted path of its value

    @property
    def measured_bytes(self) -> dict[str, int]:
        totals = {
            "sent": sum(party.bytes_sent for party in self.parties),
            "received": sum(party.bytes_received for party in self.parties),
        }
        links = [party.link_bytes_sent for party in self.parties]
        if links and all(link is not None for link in links):
            totals["link_sent"] = sum(links)
        return totals

    def party(self, name: str) -> PartyReport:
        for party in self.parties:
            if party.name == name:
                return party
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        document = {
            "schema": SCHEMA_VERSION,
            "system": self.system,
            "transport": self.transport,
            "model": self.model,
            "config": self.config,
            "answer": self.answer,
            "answer_token_ids": self.answer_token_ids,
            "parties": [party.to_json() for party in self.parties],
            "expected_bytes": self.expected_bytes,
            "measured_bytes": self.measured_bytes,
            "timing": self.timing,
            "setting": self.setting,
            "baselines": self.baselines,
        }
        _merge_unique(document, self.details, "the run")
        copies = {old: _at(document, path) for old, path in self.aliases.items()}
        _merge_unique(document, copies, "the run's aliases")
        if self.aliases:
            document["aliases"] = dict(self.aliases)
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> RunReport:
        """Read a document written by ``to_json`` (any version up to this one)."""
        if not isinstance(document, dict) or document.get("schema") not in range(1, SCHEMA_VERSION + 1):
            raise FedAttnError(f"not a run report of schema 1..{SCHEMA_VERSION}")
        try:
            parties = [PartyReport.from_json(party) for party in document["parties"]]
            known = {f.name for f in fields(cls)} - {"parties", "details"}
            derived = {"schema", "measured_bytes", *document.get("aliases", {})}
            details = {key: value for key, value in document.items() if key not in known | derived | {"parties"}}
            return cls(
                **{key: document[key] for key in known if key in document},
                parties=parties,
                details=details,
            )
        except (KeyError, TypeError) as error:
            raise FedAttnError(f"a run report is malformed ({error})") from None


def merge(reports: list[RunReport]) -> RunReport:
    """One networked run from its ranks' reports (in rank order), each with its own parties.

    The last rank asked the question, so its answer, configuration and details are the run's;
    traffic and predictions add up over the ranks; each time is the slowest rank's, as the ranks
    ran at once."""
    if not reports:
        raise FedAttnError("no rank reported")
    systems = {report.system for report in reports}
    if len(systems) > 1:
        raise FedAttnError(f"the ranks ran different systems: {', '.join(sorted(systems))}")
    last = reports[-1]
    return RunReport(
        system=last.system,
        transport=last.transport,
        model=last.model,
        config=last.config,
        answer=last.answer,
        answer_token_ids=last.answer_token_ids,
        parties=[party for report in reports for party in report.parties],
        expected_bytes=_sums([report.expected_bytes for report in reports]),
        timing={key: max(report.timing.get(key, 0.0) for report in reports) for key in last.timing},
        details=last.details,
        setting=last.setting,
        baselines=_sums([report.baselines for report in reports]),
        aliases=last.aliases,
    )


def _sums(counts: list[dict[str, int]]) -> dict[str, int]:
    keys = dict.fromkeys(key for count in counts for key in count)
    return {key: sum(count.get(key, 0) for count in counts) for key in keys}


def _at(document: dict[str, Any], path: str) -> Any:
    """The value at a dotted path ("config.kv_codec")."""
    value: Any = document
    for key in path.split("."):
        value = value[key]
    return value


def _is_timing(key: str, value: Any) -> bool:
    return key.endswith("_s") and isinstance(value, (int, float)) and not isinstance(value, bool)


def _merge_unique(document: dict[str, Any], extra: dict[str, Any], where: str) -> None:
    clash = set(document) & set(extra)
    if clash:
        raise ValueError(f"{where}: detail fields {sorted(clash)} shadow report fields")
    document.update(extra)


def report_of_party(document: Any, system: str, label: str, name: str, rank: int, role: str | None = None) -> RunReport:
    """A peer's document read as ``system``'s report of party ``name`` alone, at ``rank`` (in
    ``role`` when given): what a query's starter accepts before merging (ProtocolError if not;
    ``label`` is the system as a message names it)."""
    try:
        report = RunReport.from_json(document)
    except FedAttnError as error:
        raise ProtocolError(f"{name}'s report: {error}") from None
    own = [(party.name, party.rank, role if role is None else party.role) for party in report.parties]
    if report.system != system or own != [(name, rank, role)]:
        place = f"rank {rank}" if role is None else f"rank {rank}, {role}"
        raise ProtocolError(f"{name}'s report is not a {label} report of {name} ({place}) alone")
    return report
