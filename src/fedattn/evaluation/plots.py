"""``fedattn plot RESULTS...``: the paper's figures from evaluation result folders.

A result folder's ``summary.json`` has the harness's one shape (``fedattn.evaluation.harness``):
the task's ``metrics``, the bytes and time per query, and ``settings``, the system's reading of
its configuration, flat and named like the command-line options (``sync_every``, ``parties``).
Plots name the values they need; a name is looked up as a dotted path in the metrics
(``average.em``), then among the summary's own numbers (``bytes_per_query``), then among the
settings. A folder that lacks a value is skipped with a one-line message on stderr: a sweep half
finished, or mixed with other runs, still plots what it can. Folders of an earlier fedattn are
skipped with the command that converts them (``fedattn results upgrade``).

Each plot returns what it drew (``Drawn``: every line, point set and bar set read back from the
figure before it is saved), so what a figure shows can be checked without looking at pixels.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedattn.errors import FedAttnError
from fedattn.evaluation.harness import SUMMARY_FORMAT
from fedattn.evaluation.results import summary_paths
from fedattn.systems.base import HIDDEN, KV, TEXT, Exposure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_SIZE = (6, 4)  # inches
DPI = 100
DEFAULT_BYTES = "bytes_per_query"
# line plots: EM vs H, EM vs N (FedAttn); quality vs the noise on hidden states, absolute or relative (FedSEA)
SWEEPS = ("sync_every", "parties", "noise", "noise_relative")
ABLATIONS = ("placement", "ratio_comp", "ratio_comm", "publisher_sync_every")  # bar charts
# settings that change along with a compared one: H fixes the number of sync blocks; a placement
# keeps that number but has no H; a run without noise has both noise settings 0
DEPENDENT = {
    "sync_every": ("sync_blocks",),
    "placement": ("sync_every", "sync_layers"),
    "noise": ("noise_relative",),
    "noise_relative": ("noise",),
}
MISSING = object()


def _lookup(document: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(document, dict) or part not in document:
            return MISSING
        document = document[part]
    return document


@dataclass
class Result:
    """One result folder's summary."""

    folder: Path
    summary: dict
    settings: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.settings = self.summary.get("settings", {})

    def get(self, name: str) -> Any:
        """A metric, else one of the summary's numbers, else a setting, else ``MISSING`` (None is a real value)."""
        value = _lookup(self.summary.get("metrics", {}), name)
        if value is not MISSING:
            return value
        own = self.summary.get(name, MISSING)
        if own is None or _is_number(own):
            return own
        return self.settings.get(name, MISSING)

    @property
    def reference(self) -> bool:
        """A baseline that exchanges nothing (centralized, publisher alone)."""
        return bool(self.summary.get("reference"))

    @property
    def label(self) -> str:
        """What sets this run apart (the system's label), else the folder's name."""
        return self.summary.get("setting") or self.folder.name


def skip(folder: Path, reason: str) -> None:
    print(f"fedattn plot: skipping {folder}: {reason}", file=sys.stderr)


def load_results(paths: list[Path]) -> list[Result]:
    """Each path is a result folder, or a folder whose subfolders (at any depth) are result folders."""
    results = []
    for path in paths:
        summaries = summary_paths(path)
        if not summaries:
            skip(path, "no summary.json in it or below it")
        for summary in summaries:
            try:
                document = json.loads(summary.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                skip(summary.parent, f"unreadable summary.json ({error})")
                continue
            reason = not_a_result(document, summary.parent)
            if reason:
                skip(summary.parent, reason)
            else:
                results.append(Result(summary.parent, document))
    return results


def not_a_result(document: Any, folder: Path) -> str | None:
    """Why a summary is no evaluation result of the harness's shape; None when it is one."""
    if not isinstance(document, dict):
        return "summary.json is not a JSON object"
    if "rate" in document:
        return "an attack's folder (give it with --attack)"
    if document.get("format") != SUMMARY_FORMAT:
        return f"a summary of an earlier fedattn (convert it once: fedattn results upgrade {folder})"
    return None


def load_command_results(paths: list[Path]) -> list[Result]:
    """``load_results`` for a command (plot, compare): refused in one line when no path holds a
    summary (rather than a skip line for each), or when none of them can be read."""
    if not any(summary_paths(path) for path in paths):
        raise FedAttnError("no result folder with a summary.json among the given paths")
    results = load_results(paths)
    if not results:
        raise FedAttnError("no readable summary.json among the given paths")
    return results


def _as_results(items: list[Path | Result]) -> list[Result]:
    """Folders are read; already loaded results (the CLI reads each folder once) pass through."""
    paths = [item for item in items if not isinstance(item, Result)]
    return [item for item in items if isinstance(item, Result)] + (load_results(paths) if paths else [])


def having(results: list[Result], *names: str, numbers: tuple[str, ...] = ()) -> list[Result]:
    """The results that carry every one of ``names`` (and a number for each of ``numbers``); the
    others are skipped with a message."""
    kept = []
    for result in results:
        absent = [name for name in (*names, *numbers) if result.get(name) is MISSING]
        not_numbers = [name for name in numbers if name not in absent and not _is_number(result.get(name))]
        if absent:
            skip(result.folder, f"no {', '.join(repr(name) for name in absent)}")
        elif not_numbers:
            skip(result.folder, f"{', '.join(repr(name) for name in not_numbers)} is not a number")
        else:
            kept.append(result)
    return kept


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(results: list[Result], x: str) -> dict[str, list[Result]]:
    """Group by the settings that differ among ``results`` (besides ``x``), so one plot of a mixed
    set of folders shows each sweep as its own line instead of zig-zagging across them."""
    ignored = {x, *DEPENDENT.get(x, ())}
    varying = sorted(
        key
        for key in {key for result in results for key in result.settings}
        if key not in ignored and _distinct(results, key, missing=True) > 1
    )
    groups: dict[str, list[Result]] = defaultdict(list)
    for result in results:
        label = ", ".join(f"{key}={_text(result.settings.get(key))}" for key in varying)
        groups[label].append(result)
    return dict(groups)


def matched(results: list[Result], key: str) -> list[Result]:
    """The largest set of runs alike in everything but ``key`` (an ablation compares only those);
    all of ``results`` when no two runs form such a set."""
    ignored = {key, *DEPENDENT.get(key, ())}
    groups: dict[str, list[Result]] = defaultdict(list)
    for result in results:
        rest = {k: v for k, v in result.settings.items() if k not in ignored}
        groups[json.dumps(rest, sort_keys=True, default=str)].append(result)
    best = max(groups.values(), key=lambda group: _distinct(group, key))
    if _distinct(best, key) < 2:
        return results
    if len(best) < len(results):
        print(
            f"fedattn plot: {key}: comparing the {len(best)} runs that differ only in {key}, "
            f"not the other {len(results) - len(best)}",
            file=sys.stderr,
        )
    return best


def _distinct(results: list[Result], key: str, missing: bool = False) -> int:
    """How many values of ``key`` the results take (a missing value counts only with ``missing``)."""
    values = [result.get(key) for result in results]
    return len(
        {
            json.dumps(None if value is MISSING else value, sort_keys=True)
            for value in values
            if missing or value is not MISSING
        }
    )


def _text(value: Any) -> str:
    return "none" if value is None else str(value)


def _pyplot():
    """matplotlib on first use (building the CLI parser should not pay for it), drawing to files
    only: no display, no GUI toolkit."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


FRONTIER_SIZE = (9, 4)  # room for the legend beside the axes


@dataclass(frozen=True)
class Series:
    """One thing drawn: a line (an axhline too: its x is the axes' 0..1), a set of points, or bars
    (x: their tick labels). ``axis`` 0 is the main axes, 1 a second y axis."""

    kind: str  # "line", "points" or "bars"
    label: str
    x: list
    y: list
    axis: int = 0


@dataclass(frozen=True)
class Drawn:
    """A saved figure and everything drawn on it, read back from the figure's own artists."""

    path: Path
    series: list[Series]

    def labelled(self, label: str) -> Series:
        matches = [entry for entry in self.series if entry.label == label]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} series labelled {label!r} in {self.path.name}")
        return matches[0]


def new_figure() -> tuple[Figure, Any]:
    figure, axes = _pyplot().subplots(figsize=FIGURE_SIZE, dpi=DPI)
    return figure, axes


def save_figure(figure: Figure, out: Path) -> Drawn:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=DPI, format="png")
    drawn = Drawn(out, drawn_series(figure))
    _pyplot().close(figure)
    return drawn


def drawn_series(figure: Figure) -> list[Series]:
    """Every line, scatter and bar set on the figure's axes, as plain numbers and labels."""
    found = []
    for axis, axes in enumerate(figure.axes):
        for line in axes.get_lines():
            found.append(Series("line", line.get_label(), _plain(line.get_xdata()), _plain(line.get_ydata()), axis))
        for points in axes.collections:
            offsets = points.get_offsets()
            found.append(Series("points", points.get_label(), _plain(offsets[:, 0]), _plain(offsets[:, 1]), axis))
        if axes.patches:
            ticks = [tick.get_text() for tick in axes.get_xticklabels()]
            found.append(Series("bars", axes.get_ylabel(), ticks, [bar.get_height() for bar in axes.patches], axis))
    return found


def _plain(values: Any) -> list:
    return [value.item() if hasattr(value, "item") else value for value in values]


def plot_vs_parameter(
    folders: list[Path | Result],
    out: Path,
    x: str = "sync_every",
    y: str = "em",
    bytes_axis: bool = True,
    bytes_key: str = DEFAULT_BYTES,
) -> Drawn | None:
    """``y`` against a swept parameter (EM vs H, EM vs N), with bytes per query on a second axis.
    A baseline that lacks ``x`` (centralized N = 1 against H) is a reference line. Returns None
    (after saying why) when no folder has both values."""
    loaded = _as_results(folders)
    references = [
        result for result in loaded if result.reference and result.get(x) is MISSING and _is_number(result.get(y))
    ]
    results = having([result for result in loaded if result not in references], numbers=(x, y))
    drawn = [result for group in series(results, x).values() if _distinct(group, x) > 1 for result in group]
    lines = series(drawn, x)  # labels name only what differs among the lines drawn
    if not lines:
        print(
            f"fedattn plot: no runs alike in all but {x!r} take two values of it; {out.name} not drawn", file=sys.stderr
        )
        return None
    figure, axes = new_figure()
    for reference in references:
        axes.axhline(reference.get(y), color="grey", linestyle=":", label=reference.label)
    twin = axes.twinx() if bytes_axis else None
    for index, (label, group) in enumerate(lines.items()):  # a lone point is no sweep
        group = sorted(group, key=lambda result: result.get(x))
        colour = f"C{index}"
        xs = [result.get(x) for result in group]
        name = " ".join(part for part in group[0].label.split() if not part.startswith(f"{x}="))
        axes.plot(xs, [result.get(y) for result in group], marker="o", color=colour, label=name or label or y)
        with_bytes = [result for result in group if _is_number(result.get(bytes_key))]
        if twin is not None and with_bytes:
            twin.plot(
                [r.get(x) for r in with_bytes],
                [r.get(bytes_key) for r in with_bytes],
                linestyle="--",
                marker="x",
                color=colour,
                alpha=0.6,
                label=f"{name or label or y} ({bytes_key})",
            )
    if all(isinstance(result.get(x), int) for group in lines.values() for result in group):
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    if twin is not None:
        twin.set_ylabel(f"{bytes_key} (dashed)")
    axes.legend(fontsize=7)
    axes.set_title(f"{y} vs {x}", fontsize=9)
    return save_figure(figure, out)


def plot_ablation(folders: list[Path | Result], out: Path, key: str, y: str = "em") -> Drawn | None:
    """A bar per value of ``key`` (placement, sparsity ratio, publisher sync interval); a None value
    is the run without that variant and is labelled 'none'."""
    results = having(_as_results(folders), key, numbers=(y,))
    if not results:
        print(f"fedattn plot: no folder has both {key!r} and {y!r}; {out.name} not drawn", file=sys.stderr)
        return None
    results = matched(results, key)
    results = sorted(results, key=lambda result: (result.get(key) is not None, str(result.get(key))))
    labels = [_text(result.get(key)) for result in results]
    labels = [
        f"{label}\n({result.folder.name})" if labels.count(label) > 1 else label
        for label, result in zip(labels, results)
    ]
    figure, axes = new_figure()
    axes.bar(range(len(results)), [result.get(y) for result in results], color="C0")
    axes.set_xticks(range(len(results)), labels, fontsize=7)
    axes.set_xlabel(key)
    axes.set_ylabel(y)
    axes.set_title(f"{y} by {key}", fontsize=9)
    return save_figure(figure, out)


def plot_frontier(
    folders: list[Path | Result], out: Path, y: str = "em", bytes_key: str = DEFAULT_BYTES
) -> Drawn | None:
    """Quality against bytes per query, one labelled point per run, log x. Runs that send nothing
    (centralized, publisher alone) cannot sit on a log axis: they become reference lines."""
    results = having(_as_results(folders), numbers=(y, bytes_key))
    if not results:
        print(f"fedattn plot: no folder has both {y!r} and {bytes_key!r}; {out.name} not drawn", file=sys.stderr)
        return None
    figure, axes = new_figure()
    points = [result for result in results if result.get(bytes_key) > 0]
    for index, result in enumerate(result for result in results if result.get(bytes_key) <= 0):
        axes.axhline(result.get(y), color=f"C{index + 1}", linestyle=":", label=f"{result.label} (0 bytes)")
    for number, result in enumerate(points, start=1):  # numbered points, labels in the legend: no overlaps
        x, value = result.get(bytes_key), result.get(y)
        axes.scatter([x], [value], color="C0", zorder=3, label=f"{number}: {result.label}")
        axes.annotate(
            str(number), (x, value), fontsize=7, xytext=(3, 3), textcoords="offset points", annotation_clip=True
        )
    if points:
        axes.set_xscale("log")
        from matplotlib.ticker import NullFormatter

        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel(f"{bytes_key} (log)")
    axes.set_ylabel(y)
    axes.set_title(f"{y} vs communication", fontsize=9)
    axes.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.set_size_inches(FRONTIER_SIZE)
    return save_figure(figure, out)


@dataclass(frozen=True)
class Recovery:
    """One measured point of an attack: the share of private tokens it recovered from what a run
    sends (``sent``: "kv" or "hidden", as in ``systems.base.Exposure``) at ``block``, through
    ``codec`` (None: whatever the codec), at ``noise`` (relative to the mean |x| when ``relative``)."""

    sent: str
    codec: str | None
    block: int
    noise: float
    relative: bool
    rate: float

    def covers(self, exposure: Exposure) -> bool:
        """Whether this point measured one of the blocks the run sends, as the run sends it (no
        noise is no noise, relative or not)."""
        return (
            self.sent == exposure.sent
            and self.codec in (None, exposure.codec)
            and self.block in exposure.blocks
            and (self.relative == exposure.relative or exposure.noise == 0)
            and math.isclose(self.noise, exposure.noise, rel_tol=1e-6, abs_tol=1e-12)
        )


def worst_recovery(recoveries: list[Recovery], exposure: dict | Exposure) -> tuple[float, int] | None:
    """The highest recovery rate over the blocks the run sends, as it sends them, and that block;
    None when no attack covered any of them."""
    if isinstance(exposure, dict):
        exposure = Exposure.from_json(exposure)
    rates = [(point.rate, point.block) for point in recoveries if point.covers(exposure)]
    return max(rates) if rates else None


def read_attacks(folders: list[Path]) -> list[Recovery]:
    """Every point of these ``fedattn attack`` / ``attack-split`` folders (through the codec each attacked)."""
    recoveries = []
    for folder in folders:
        path = folder / "summary.json"
        if not path.is_file():
            why = f"no summary.json (run fedattn attack or attack-split --out {folder} first)"
            raise FedAttnError(f"--attack {folder}: {why}")
        recoveries += attack_recoveries(json.loads(path.read_text(encoding="utf-8")))
    return recoveries


def attack_recoveries(attack: dict) -> list[Recovery]:
    """A ``fedattn attack`` summary's rates ({block: {noise: rate}}: K/V) or a ``fedattn
    attack-split`` summary's ({"ATTACK A=a": {noise: rate}}: hidden states after block a) as points."""
    config = attack.get("config", {})
    if "client_blocks" in config:
        relative = bool(config.get("noise_relative"))
        return [
            Recovery(HIDDEN, config.get("hidden_codec"), int(name.rpartition("A=")[2]), float(noise), relative, rate)
            for name, by_noise in attack.get("rate", {}).items()
            for noise, rate in by_noise.items()
        ]
    return [
        Recovery(KV, config.get("kv_codec"), int(block), float(noise), False, float(rate))
        for block, by_noise in attack.get("rate", {}).items()
        for noise, rate in by_noise.items()
    ]


LEAKAGE_COLUMNS = ("block", "noise", "relative", "recovery")  # and optionally sent, codec


def read_leakage(path: Path) -> list[Recovery]:
    """A leakage table from any attack (``--leakage FILE``): CSV with a header, or a JSON list of
    objects, with ``block`` (for hidden states: A, the blocks run before they are sent), ``noise``,
    ``relative`` (true/false), ``recovery`` (0..1), and optionally ``sent`` ("hidden" by default,
    or "kv") and ``codec`` (when absent the point stands for every codec)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FedAttnError(f"--leakage {path}: cannot read it ({error})") from None
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise FedAttnError(f"--leakage {path}: not JSON ({error.msg})") from None
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise FedAttnError(f"--leakage {path}: expected a JSON list of objects")
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    return [_leakage_row(path, number, row) for number, row in enumerate(rows, start=1)]


def _leakage_row(path: Path, number: int, row: dict) -> Recovery:
    where = f"--leakage {path}, row {number}"
    missing = [column for column in LEAKAGE_COLUMNS if row.get(column) in (None, "")]
    if missing:
        raise FedAttnError(f"{where}: no {', '.join(missing)} (columns: {', '.join(LEAKAGE_COLUMNS)}[, sent, codec])")
    sent = row.get("sent") or HIDDEN
    relative = str(row["relative"]).strip().lower()
    try:
        block, noise, rate = int(row["block"]), float(row["noise"]), float(row["recovery"])
    except (TypeError, ValueError):
        raise FedAttnError(f"{where}: block must be a whole number, noise and recovery numbers") from None
    if sent not in (KV, HIDDEN) or relative not in ("true", "false", "1", "0") or not 0.0 <= rate <= 1.0:
        raise FedAttnError(f"{where}: sent must be kv or hidden, relative true or false, recovery in 0..1")
    return Recovery(sent, row.get("codec") or None, block, noise, relative in ("true", "1"), rate)


def read_leakage_sources(attacks: list[Path] | None, tables: list[Path] | None) -> list[Recovery]:
    """What ``--attack`` folders and ``--leakage`` tables measured, together."""
    return read_attacks(attacks or []) + [point for table in tables or [] for point in read_leakage(table)]


def leakage(result: Result, recoveries: list[Recovery]) -> tuple[float, int] | None:
    """The run's leakage (see ``plot_privacy``); None when it exposes nothing or nothing covered it."""
    exposure = result.summary.get("exposure")
    return None if exposure is None else worst_recovery(recoveries, exposure)


def plot_privacy(folders: list[Path | Result], recoveries: list[Recovery], out: Path, y: str = "em") -> Drawn | None:
    """Quality against leakage, one point per run: the leakage of a run is the best recovery rate
    an attack measured at any block the run sends, as the run sends it (K/V or hidden states,
    through its codec, at its noise: ``fedattn attack`` folders and ``--leakage`` tables); an
    attacker picks its best block, and blocks no attack covered are not counted, so this is a
    lower bound."""
    points = []
    for result in having(_as_results(folders), numbers=(y,)):
        if result.reference:
            continue
        worst = leakage(result, recoveries)
        if worst is None:
            skip(result.folder, f"no attack measured what it sends ({exposure_text(result.summary.get('exposure'))})")
        else:
            points.append((result, *worst))
    if not points:
        print(
            f"fedattn plot: no run matches an attack's codec, blocks and noise levels; {out.name} not drawn",
            file=sys.stderr,
        )
        return None
    figure, axes = new_figure()
    for number, (result, rate, block) in enumerate(points, start=1):
        axes.scatter([rate], [result.get(y)], color="C0", zorder=3, label=f"{number}: {result.label} (block {block})")
        axes.annotate(str(number), (rate, result.get(y)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("tokens recovered by the attack (best sent block)")
    axes.set_ylabel(y)
    axes.set_xlim(-0.02, 1.02)
    axes.set_title(f"{y} vs leakage", fontsize=9)
    axes.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.set_size_inches(FRONTIER_SIZE)
    return save_figure(figure, out)


def exposure_text(document: dict | None) -> str:
    """'K/V at blocks 0, 8 through int8 at noise 0.3', 'hidden states after block 2 through float32 ...',
    or 'the prompt in clear' ('the rephrased prompt in clear')."""
    if document is None:
        return "nothing exposed"
    exposure = Exposure.from_json(document)
    if exposure.sent == TEXT:
        return "the prompt in clear" if exposure.codec == "plain" else f"the {exposure.codec} prompt in clear"
    noise = f"{exposure.noise:g}" + (" x mean|x|" if exposure.relative else "")
    if exposure.sent == HIDDEN:
        what = f"hidden states after block {', '.join(map(str, exposure.blocks))}"
    else:
        what = f"K/V at blocks {', '.join(map(str, exposure.blocks))}"
    return f"{what} through codec {exposure.codec} at noise {noise}"


# -- command line -------------------------------------------------------------------------------
def plot_training(folders: list[Path], out: Path) -> Drawn:
    """Held-out loss (and the training loss) per optimiser step of each training run: a run's
    ``log.jsonl`` holds one record per step, with ``held_out_loss`` every few steps."""
    figure, axes = new_figure()
    for folder in folders:
        records = read_training_log(folder)
        held = [record for record in records if _is_number(record.get("held_out_loss"))]
        trained = [record for record in records if _is_number(record.get("train_loss"))]
        line = axes.plot([r["step"] for r in held], [r["held_out_loss"] for r in held], marker="o", label=folder.name)
        axes.plot(
            [r["step"] for r in trained],
            [r["train_loss"] for r in trained],
            alpha=0.35,
            color=line[0].get_color(),
            label=f"{folder.name} (training batches)",
        )
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("cross-entropy per response token")
    axes.legend(fontsize="small")
    return save_figure(figure, out)


def read_training_log(folder: Path) -> list[dict]:
    path = folder / "log.jsonl"
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FedAttnError(f"cannot read {path} as a training log: {error}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fedattn.argtypes import existing_path, output_folder

    parser.add_argument(
        "results", nargs="*", type=existing_path, metavar="RESULTS", help="result folders (or folders holding them)"
    )
    parser.add_argument(
        "--training",
        type=existing_path,
        action="append",
        metavar="DIR",
        help="a training run's folder (its log.jsonl, e.g. `fedattn refine train`): draw its losses per step",
    )
    parser.add_argument("--out", type=output_folder, default=Path("plots"), help="folder for the PNGs (default plots)")
    parser.add_argument(
        "--metric",
        help="quality: a dotted path in the summary's metrics such as f1 or party_average.em "
        "(default: the tasks' main metric, em for GSM8K and CrossFacts)",
    )
    parser.add_argument(
        "--attack",
        type=Path,
        action="append",
        metavar="DIR",
        help="a `fedattn attack` folder (repeat for other codecs): also draw quality against leakage",
    )
    add_leakage_argument(parser)
    parser.add_argument(
        "--bytes-metric",
        default=DEFAULT_BYTES,
        help=f"communication per query: a summary number such as expected_bytes_per_query (default {DEFAULT_BYTES})",
    )


def add_leakage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--leakage",
        type=Path,
        action="append",
        metavar="FILE",
        help="a table of token recovery by any attack (CSV or JSON: block, noise, relative, recovery[, sent, codec]; "
        "repeatable): also draw quality against leakage",
    )


def main_metric(results: list[Result]) -> str:
    """The main metric the folders' tasks share."""
    metrics = Counter(result.summary["main_metric"] for result in results)
    if len(metrics) > 1:
        raise FedAttnError(f"the folders' tasks measure different qualities ({', '.join(metrics)}): choose --metric")
    return next(iter(metrics))


def _swept(results: list[Result], x: str) -> bool:
    """Whether some runs alike in everything else take two values of ``x`` (a line to draw)."""
    numeric = [result for result in results if _is_number(result.get(x))]
    return any(_distinct(group, x) > 1 for group in series(numeric, x).values())


def run(args: argparse.Namespace) -> int:
    """Draw every plot the folders support (a sweep needs two values of its parameter) and list them."""
    if not args.results and not args.training:
        raise FedAttnError("give result folders, or --training DIR")
    curves = [plot_training(args.training, args.out / "training_loss.png")] if args.training else []
    if not args.results:
        for entry in curves:
            print(entry.path)
        return 0
    results = load_command_results(args.results)
    metric = args.metric or main_metric(results)
    recoveries = read_leakage_sources(args.attack, args.leakage)
    if not any(_is_number(result.get(metric)) for result in results):  # one line, not a skip per folder
        raise FedAttnError(f"nothing to plot: no folder carries a number at {metric!r}")
    folders = having(results, numbers=(metric,))
    drawn = []
    for x in SWEEPS:
        if _swept(folders, x):
            out = args.out / f"{metric}_vs_{x}.png"
            drawn.append(plot_vs_parameter(folders, out, x, metric, True, args.bytes_metric))
    for key in ABLATIONS:
        if _distinct(folders, key) > 1:
            drawn.append(plot_ablation(folders, args.out / f"{metric}_by_{key}.png", key, metric))
    drawn.append(plot_frontier(folders, args.out / f"{metric}_frontier.png", metric, args.bytes_metric))
    if recoveries:
        drawn.append(plot_privacy(folders, recoveries, args.out / f"{metric}_vs_leakage.png", metric))
    written = [entry.path for entry in [*curves, *drawn] if entry is not None]
    if not written:
        raise FedAttnError(
            f"nothing to plot: no folder carries {metric!r} (and {args.bytes_metric!r} for the frontier)"
        )
    for path in written:
        print(path)
    return 0
