"""Human-readable output: a run's answer, its traffic and its times, sized for an 80-column terminal.

One ``print_report`` serves every view of a run (in-process, one networked party, the launcher's
merge): it reads only the report schema. Besides the schema's fields it shows, where a system
reports them in a party's details, ``tokens`` (the prompt tokens the party holds) and
``kept_tokens`` (those it computed on, when fewer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedattn.report.schema import PartyReport, RunReport


def format_bytes(count: float) -> str:
    if count < 1000:
        return f"{count:.0f} B"
    for unit in ("KB", "MB"):
        count /= 1000
        if count < 1000:
            return f"{count:.1f} {unit}"
    return f"{count / 1000:.1f} GB"


def print_report(report: RunReport, console: Console | None = None) -> None:
    """The answers, what ran (model, setting, transport), a traffic table, a time table and the
    run's totals."""
    console = console or Console()
    *others, last = report.parties
    if report.answer is not None:
        console.print(f"[bold]Answer[/bold] ({escape(last.name)}): {escape(report.answer)}")
    for party in others:
        if party.answer is not None:
            console.print(f"[dim]{escape(party.name)}[/dim]: {escape(party.answer)}")
    console.print(
        escape(" · ".join(part for part in (report.model.get("name"), report.setting, report.transport) if part))
    )
    console.print(traffic_table(report.parties))
    times = time_table(report.parties)
    if times.columns[1:]:
        console.print(times)
    for line in _totals(report):
        console.print(line)


def traffic_table(parties: list[PartyReport]) -> Table:
    """Bytes per party: measured at its transport, predicted by the cost model, and (networked)
    what crossed its links."""
    columns: dict[str, Callable[[PartyReport], str]] = {}
    tokens = [party.details.get("tokens") for party in parties]
    kept = [party.details.get("kept_tokens", count) for party, count in zip(parties, tokens)]
    if None not in tokens:
        columns["tokens"] = lambda party: str(party.details["tokens"])
    if kept != tokens:
        columns["kept"] = lambda party: str(party.details.get("kept_tokens", ""))
    columns["sent"] = lambda party: format_bytes(party.bytes_sent)
    columns["received"] = lambda party: format_bytes(party.bytes_received)
    if all(party.expected_bytes_sent is not None for party in parties):
        columns["predicted"] = lambda party: format_bytes(party.expected_bytes_sent)
    if all(party.link_bytes_sent is not None for party in parties):
        columns["link"] = lambda party: format_bytes(party.link_bytes_sent)
    return _table("bytes", parties, columns)


def time_table(parties: list[PartyReport]) -> Table:
    """Seconds per party and phase; a phase no party spent time in is left out."""
    keys = dict.fromkeys(key for party in parties for key in party.timing)
    spent = [key for key in keys if any(party.timing.get(key) for party in parties)]
    columns = {_time_header(key): _seconds(key) for key in spent}
    return _table("seconds", parties, columns)


def _table(title: str, parties: list[PartyReport], columns: dict[str, Callable[[PartyReport], str]]) -> Table:
    table = Table(title=title)
    table.add_column("party", no_wrap=True)
    for header in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for party in parties:
        table.add_row(escape(party.name), *(cell(party) for cell in columns.values()))
    return table


def _time_header(key: str) -> str:
    return {"wait_s": "waited"}.get(key, key.removesuffix("_s"))


def _seconds(key: str) -> Callable[[PartyReport], str]:
    return lambda party: f"{party.timing.get(key, 0.0):.2f}"


def _totals(report: RunReport) -> list[str]:
    """The run's times, then its traffic against the prediction and the baselines."""
    times = []
    for key, value in report.timing.items():
        if key.endswith("_per_s"):
            times.append(f"{value:.1f} {key.removesuffix('_per_s').replace('_', ' ')}/s")
        else:
            times.append(f"{key.removesuffix('_s')} {value:.2f} s")
    sent = report.measured_bytes["sent"]
    traffic = [f"sent {format_bytes(sent)}"]
    if "sent" in report.expected_bytes:
        traffic[0] += f" (predicted {format_bytes(report.expected_bytes['sent'])})"
    for name, baseline in report.baselines.items():
        traffic.append(f"{escape(name)} {format_bytes(baseline)} ({format_bytes(baseline - sent)} saved)")
    return [" · ".join(times), " · ".join(traffic)]


def print_models(rows: list[dict], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="fedattn models")
    columns = [key for key in ("name", "installed", "cached", "size", "description") if any(key in row for row in rows)]
    for column in columns:
        table.add_column(column, no_wrap=column == "name")
    for row in rows:
        table.add_row(*(escape(_cell(row.get(column))) for column in columns))
    console.print(table)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)


@contextmanager
def progress_bar(label: str, total: int, completed: int = 0, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """A bar with elapsed time and ETA on stderr (none when ``quiet``, e.g. with --json); yields the
    function that advances it (by one, or by its argument). ``completed`` counts items a resumed
    run already has."""
    if quiet:
        yield lambda count=1: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, completed=completed)
        yield lambda count=1: bar.advance(task, count)
