"""Human-readable output: the answer and the per-party traffic table."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedattn.systems.fedattn.query import QueryReport


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count}"


def print_report(report: QueryReport, model_name: str, console: Console | None = None) -> None:
    console = console or Console()
    result = report.result
    console.print(f"[bold]Answer[/bold] (publisher): {escape(report.answer)}")
    for rank, text in report.answer_texts.items():
        if rank != len(result.parties) - 1:
            console.print(f"[dim]{result.parties[rank].name}[/dim]: {escape(text)}")
    table = Table(
        title=escape(f"{model_name} · {report.config.schedule.describe()} · K/V as {report.config.codec.name}")
    )
    table.add_column("party", no_wrap=True)
    for column in ("tokens", "kept", "sent", "received", "predicted", "prefill s", "decode s"):
        table.add_column(column, justify="right")
    for party, cost in zip(result.parties, report.expected):
        table.add_row(
            party.name,
            str(party.tokens),
            str(party.kept_tokens),
            format_bytes(party.bytes_sent),
            format_bytes(party.bytes_received),
            format_bytes(cost.wire_bytes_sent),
            f"{party.prefill_s:.2f}",
            f"{party.decode_s:.2f}",
        )
    console.print(table)
    console.print(
        f"prefill {result.prefill_s:.2f} s · decode {result.decode_s:.2f} s "
        f"({result.decode_tokens_per_s:.1f} tok/s) · "
        f"total traffic {format_bytes(sum(p.bytes_sent for p in result.parties))} sent"
    )


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


def _party_table(title: str, parties: list[dict]) -> Table:
    table = Table(title=escape(title))
    table.add_column("party", no_wrap=True)
    for column in ("tokens", "sent", "received", "predicted", "link sent", "prefill s", "waited s", "decode s"):
        table.add_column(column, justify="right")
    for party in parties:
        table.add_row(
            party["name"],
            str(party["tokens"]),
            format_bytes(party["bytes_sent"]),
            format_bytes(party["bytes_received"]),
            format_bytes(party["expected_bytes_sent"]),
            format_bytes(party["link_bytes_sent"]),
            f"{party['prefill_s']:.2f}",
            f"{party['wait_s']:.2f}",
            f"{party['decode_s']:.2f}",
        )
    return table


def print_party_report(report: dict, console: Console | None = None) -> None:
    """One networked party's own view (``fedattn participant``)."""
    console = console or Console()
    if report["answer"] is not None:
        console.print(f"[bold]Answer[/bold] ({report['name']}): {escape(report['answer'])}")
    console.print(_party_table(f"{report['name']} · {report['schedule']}", [report]))


def print_merged_report(merged: dict, console: Console | None = None) -> None:
    """The launcher's view of a networked run."""
    console = console or Console()
    console.print(f"[bold]Answer[/bold] (publisher): {escape(merged['answer'] or '')}")
    console.print(
        _party_table(
            f"{merged['model']['name']} · {merged['schedule']} · {merged['transport']}", merged["participants"]
        )
    )
    measured, naive = merged["measured_bytes"]["sent"], merged["all_gather_bytes_sent"]
    console.print(
        f"wall {merged['timing']['wall_s']:.2f} s · sent {format_bytes(measured)} "
        f"(a naive all-gather would send {format_bytes(naive)}: {format_bytes(naive - measured)} saved)"
    )


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
