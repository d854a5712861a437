"""What a person reads: every view of a run fits an 80-column terminal, nothing cut short."""

import io
import re

import pytest
from rich.console import Console

from fedattn.report.render import format_bytes, print_report
from fedattn.report.schema import PartyReport, RunReport, merge

NAMES = ["party-1", "party-2", "publisher"]
TRAFFIC_HEADERS = ["party", "tokens", "kept", "sent", "received", "predicted", "link"]
TIME_HEADERS = ["prefill", "decode", "waited", "wall"]


def party(rank: int, networked: bool) -> PartyReport:
    """Realistic figures for N = 3 on Qwen2.5-0.5B, at the widest they print (999.9 KB, 123.4 MB)."""
    timing = {"prefill_s": 12.34, "decode_s": 123.45 if rank == 2 else 0.0, "wait_s": 1.5}
    if networked:
        timing["wall_s"] = 140.12
    return PartyReport(
        NAMES[rank],
        rank,
        "publisher" if rank == 2 else "collaborator",
        bytes_sent=999_949 if rank < 2 else 84,
        bytes_received=123_449_999,
        frames_sent=26,
        frames_received=50,
        expected_bytes_sent=999_949 if rank < 2 else 84,
        expected_bytes_received=123_449_999,
        link_bytes_sent=123_449_999 if networked else None,
        timing=timing,
        answer="The ID is 5521." if rank == 2 else None,
        details={"tokens": 12_345, "kept_tokens": 6_172},
    )


def run(networked: bool, ranks: range = range(3)) -> RunReport:
    """A run (or one rank's view of it) whose cost model was exact and saved 3/4 of an all-gather."""
    parties = [party(rank, networked) for rank in ranks]
    sent = sum(party.expected_bytes_sent for party in parties)
    return RunReport(
        "fedattn",
        "torch (gloo)" if networked else "inprocess",
        {"name": "qwen2.5-coder-0.5b-instruct"},
        {},
        "The ID is 5521." if 2 in ranks else None,
        [785, 3034] if 2 in ranks else [],
        parties,
        {"sent": sent, "received": sum(party.expected_bytes_received for party in parties)},
        {"prefill_s": 12.34, "decode_s": 123.45, "decode_tokens_per_s": 12.3, "wall_s": 140.12},
        setting="sync blocks [0, 4, 8, 12, 16, 20] · K/V as bfloat16",
        baselines={"all-gather": 4 * sent},
    )


def rendered(report: RunReport) -> str:
    out = io.StringIO()
    print_report(report, Console(file=out, width=80, color_system=None))
    return out.getvalue()


@pytest.mark.parametrize(
    "report, headers",
    [
        (run(networked=False), TRAFFIC_HEADERS[:-1] + TIME_HEADERS[:-1]),
        (merge([run(True, range(rank, rank + 1)) for rank in range(3)]), TRAFFIC_HEADERS + TIME_HEADERS),
        (run(True, range(2, 3)), ["party", "tokens", "kept", "sent", "received", "predicted", "link", *TIME_HEADERS]),
    ],
    ids=["in-process", "merged", "one party"],
)
def test_every_view_fits_80_columns(report, headers):
    out = rendered(report)
    assert "\u2026" not in out, out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    header_cells = {cell.strip() for line in out.splitlines() if line.startswith("┃") for cell in line.split("┃")}
    assert set(headers) <= header_cells, out
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert rows == [party.name for party in report.parties] * 2, out  # traffic, then time
    assert f"Answer (publisher): {report.answer}" in out
    sent = report.expected_bytes["sent"]
    totals = f"sent {format_bytes(sent)} (predicted {format_bytes(sent)}) · all-gather {format_bytes(4 * sent)} "
    assert totals + f"({format_bytes(3 * sent)} saved)" in re.sub(r"\s+", " ", out), out


def test_cells_carry_the_figures():
    out = rendered(run(networked=True))
    assert re.search(r"│ party-1\s+│\s+12345 │\s+6172 │\s+999.9 KB │\s+123.4 MB │\s+999.9 KB │\s+123.4 MB │", out), out
    assert re.search(r"│ publisher\s+│\s+12.34 │\s+123.45 │\s+1.50 │\s+140.12 │", out), out


def test_kept_shows_only_when_fewer_and_idle_phases_are_left_out():
    report = run(networked=False)
    for each in report.parties:
        each.details["kept_tokens"] = each.details["tokens"]
        each.timing["wait_s"] = 0.0
    out = rendered(report)
    header_cells = {cell.strip() for line in out.splitlines() if line.startswith("┃") for cell in line.split("┃")}
    assert "kept" not in header_cells and "waited" not in header_cells
    assert {"tokens", "prefill", "decode"} <= header_cells


@pytest.mark.parametrize(
    "count, text",
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (999_949, "999.9 KB"), (12_345_678, "12.3 MB"), (5e12, "5000.0 GB")],
)
def test_format_bytes(count, text):
    assert format_bytes(count) == text
