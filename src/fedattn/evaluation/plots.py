"""``fedattn plot RESULTS...``: the paper's figures from evaluation result folders.

A result folder (see ``results.ResultStore``) holds ``summary.json``: metrics, possibly nested
(``em.publisher``), and the run's ``config``. Plots name the values they need; a name is looked
up as a dotted path in the metrics, through ``METRIC_ALIASES`` (so one name covers every
benchmark's summary), then among the run's settings (``settings``: the config flattened and named
like the command-line options, with the sync blocks turned back into ``sync_every`` or a
placement). A folder that lacks a value is skipped with a one-line message on stderr: a sweep
half finished, or mixed with other runs, still plots what it can.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedattn.errors import FedAttnError
from fedattn.systems.fedattn.schedule import PLACEMENTS, every, format_layers, placement

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_SIZE = (6, 4)  # inches
DPI = 100
DEFAULT_METRIC = "em_publisher"
DEFAULT_BYTES = "bytes_per_query"
METRIC_ALIASES = {  # first found wins: gsm8k's summary, then crossfacts'
    "em_publisher": ("em.publisher", "em"),
    "bytes_per_query": ("bytes.mean_sent_per_query", "mean_bytes_sent"),
}
SETTING_NAMES = {  # config paths -> option names
    "model.name": "model",
    "sparsity.comp": "ratio_comp",
    "sparsity.comm": "ratio_comm",
    "sparsity.comp_publisher": "ratio_comp_publisher",
    "sparsity.comm_publisher": "ratio_comm_publisher",
    "schedule.publisher_sync_every": "publisher_sync_every",
    "kv_exchange.select": "kv_select",
    "kv_exchange.noise": "kv_noise",
    "kv_exchange.budget": "kv_budget",
}
NOT_SETTINGS = (
    "model.identity",
    "model.dtype",
    "schedule.describe",
    "schedule.num_layers",
    "schedule.sync_layers",
    "schedule.publisher_layers",
)
EXCHANGE_SETTINGS = (
    "sync_every",
    "sync_blocks",
    "placement",
    "sync_layers",
    "publisher_layers",
    "publisher_sync_every",
    "kv_codec",
    "kv_select",
    "kv_noise",
    "kv_budget",
    "ratio_comm",
    "ratio_comm_publisher",
)
SWEEPS = ("sync_every", "parties")  # line plots: EM vs H, EM vs N
ABLATIONS = ("placement", "ratio_comp", "ratio_comm", "publisher_sync_every")  # bar charts
# settings that change along with a compared one: H fixes the number of sync blocks; a placement
# keeps that number but has no H
DEPENDENT = {"sync_every": ("sync_blocks",), "placement": ("sync_every", "sync_layers")}
LABEL_DEFAULTS = {
    "parties": None,
    "sync_every": None,
    "placement": "every",
    "sync_blocks": None,
    "sync_layers": None,
    "publisher_layers": "none",
    "publisher_sync_every": None,
    "ratio_comp": 1.0,
    "ratio_comm": 1.0,
    "kv_codec": None,
    "kv_select": "random",
    "kv_budget": None,
    "kv_noise": 0.0,
}
FLOAT_CODECS = ("float32", "bfloat16", "float16")  # lossless for a model computing in that dtype: not labelled
MISSING = object()


def _lookup(document: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(document, dict) or part not in document:
            return MISSING
        document = document[part]
    return document


def _flatten(document: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def schedule_settings(sync_layers: list[int], num_layers: int) -> dict[str, Any]:
    """The options that give these sync blocks: every H, else a placement of k blocks, else the list."""
    layers = tuple(sync_layers)
    if not layers:  # no collaborator sync (publisher-only schedules): no H, no placement
        return {"sync_blocks": 0}
    for interval in range(1, num_layers + 1):
        if every(interval, num_layers) == layers:
            return {"placement": "every", "sync_every": interval, "sync_blocks": len(layers)}
    for name in PLACEMENTS:
        if layers and placement(name, len(layers), num_layers) == layers:
            return {"placement": name, "sync_blocks": len(layers)}
    return {"placement": "custom", "sync_layers": list(layers)}


def settings(config: dict) -> dict[str, Any]:
    """The run's configuration as flat, comparable settings named like the command-line options."""
    flat = _flatten(config)
    named = {SETTING_NAMES.get(key, key): value for key, value in flat.items() if key not in NOT_SETTINGS}
    sync_layers, num_layers = flat.get("schedule.sync_layers"), flat.get("schedule.num_layers")
    if isinstance(sync_layers, list) and isinstance(num_layers, int):
        named |= schedule_settings(sync_layers, num_layers)
    publisher_layers = flat.get("schedule.publisher_layers")
    if isinstance(publisher_layers, list) and isinstance(num_layers, int):
        named["publisher_layers"] = publisher_setting(publisher_layers, num_layers)
    if named.get("parties") == 1 or named.get("mode", "federated") != "federated":  # nothing is exchanged
        named = {key: value for key, value in named.items() if key not in EXCHANGE_SETTINGS} | {
            "mode": named.get("mode", "centralized")
        }
    return named


def publisher_setting(layers: list[int], num_layers: int) -> str:
    """The publisher's receive blocks as a label: 'none', 'dense' (all), or the blocks ('12-23')."""
    if not layers:
        return "none"
    return "dense" if len(layers) == num_layers else format_layers(layers)


@dataclass
class Result:
    """One result folder's summary."""

    folder: Path
    summary: dict
    settings: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        config = self.summary.get("config")
        self.settings = settings(config if isinstance(config, dict) else {})

    def get(self, name: str) -> Any:
        """A metric (or an alias of one), else a setting, else ``MISSING`` (None is a real value)."""
        for path in (name, *METRIC_ALIASES.get(name, ())):
            value = MISSING if path.split(".")[0] == "config" else _lookup(self.summary, path)
            if value is not MISSING and (path == name or _is_number(value)):
                return value
        return self.settings.get(name, MISSING)


def skip(folder: Path, reason: str) -> None:
    print(f"fedattn plot: skipping {folder}: {reason}", file=sys.stderr)


def summary_files(path: Path) -> list[Path]:
    """The summaries of a result folder, or of the result folders at any depth below ``path``."""
    return [path / "summary.json"] if (path / "summary.json").is_file() else sorted(path.rglob("summary.json"))


def load_results(paths: list[Path]) -> list[Result]:
    """Each path is a result folder, or a folder whose subfolders (at any depth) are result folders."""
    results = []
    for path in paths:
        summaries = summary_files(path)
        if not summaries:
            skip(path, "no summary.json in it or below it")
        for summary in summaries:
            try:
                results.append(Result(summary.parent, json.loads(summary.read_text(encoding="utf-8"))))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                skip(summary.parent, f"unreadable summary.json ({error})")
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


def new_figure() -> tuple[Figure, Any]:
    figure, axes = _pyplot().subplots(figsize=FIGURE_SIZE, dpi=DPI)
    return figure, axes


def save_figure(figure: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=DPI, format="png")
    _pyplot().close(figure)
    return out


def plot_vs_parameter(
    folders: list[Path | Result],
    out: Path,
    x: str = "sync_every",
    y: str = DEFAULT_METRIC,
    bytes_axis: bool = True,
    bytes_key: str = DEFAULT_BYTES,
) -> Path | None:
    """``y`` against a swept parameter (EM vs H, EM vs N), with bytes per query on a second axis.
    A run that is not federated and lacks ``x`` (centralized N = 1 against H) is a reference line.
    Returns None (after saying why) when no folder has both values."""
    loaded = _as_results(folders)
    references = [
        result for result in loaded if _is_reference(result) and result.get(x) is MISSING and _is_number(result.get(y))
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
        axes.axhline(reference.get(y), color="grey", linestyle=":", label=schedule_label(reference))
    twin = axes.twinx() if bytes_axis else None
    for index, (label, group) in enumerate(lines.items()):  # a lone point is no sweep
        group = sorted(group, key=lambda result: result.get(x))
        colour = f"C{index}"
        xs = [result.get(x) for result in group]
        name = " ".join(part for part in schedule_label(group[0]).split() if not part.startswith(f"{x}="))
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


def plot_ablation(folders: list[Path | Result], out: Path, key: str, y: str = DEFAULT_METRIC) -> Path | None:
    """A bar per value of ``key`` (placement, sparsity ratio, publisher sync interval); a None value
    is the run without that variant and is labelled 'default'."""
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


def _is_reference(result: Result) -> bool:
    return result.settings.get("mode", "federated") != "federated"


def schedule_label(result: Result) -> str:
    """The schedule settings that differ from the defaults, e.g. 'parties=4 sync_every=8 ratio_comm=0.5';
    a run that is not federated (crossfacts' centralized or publisher-alone modes) is named by its
    mode alone, since its schedule settings are unused."""
    if _is_reference(result):
        return str(result.settings["mode"])
    shown = {
        key: default
        for key, default in LABEL_DEFAULTS.items()
        if not (key == "sync_blocks" and "sync_every" in result.settings)
    }
    if result.settings.get("kv_codec") in FLOAT_CODECS:
        shown["kv_codec"] = result.settings["kv_codec"]
    parts = [
        f"{key}={result.settings[key]}"
        for key, default in shown.items()
        if result.settings.get(key, default) not in (default, None)
    ]
    return " ".join(parts) or result.folder.name


def plot_frontier(
    folders: list[Path | Result], out: Path, y: str = DEFAULT_METRIC, bytes_key: str = DEFAULT_BYTES
) -> Path | None:
    """Quality against bytes per query, one labelled point per schedule, log x. Runs that send
    nothing (centralized, publisher alone) cannot sit on a log axis: they become reference lines."""
    results = having(_as_results(folders), numbers=(y, bytes_key))
    if not results:
        print(f"fedattn plot: no folder has both {y!r} and {bytes_key!r}; {out.name} not drawn", file=sys.stderr)
        return None
    figure, axes = new_figure()
    points = [result for result in results if result.get(bytes_key) > 0]
    for index, result in enumerate(result for result in results if result.get(bytes_key) <= 0):
        axes.axhline(result.get(y), color=f"C{index + 1}", linestyle=":", label=f"{schedule_label(result)} (0 bytes)")
    for number, result in enumerate(points, start=1):  # numbered points, labels in the legend: no overlaps
        x, value = result.get(bytes_key), result.get(y)
        axes.scatter([x], [value], color="C0", zorder=3, label=f"{number}: {schedule_label(result)}")
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


def sent_blocks(result: Result) -> set[int]:
    """Every block at which the run sends some party's K/V to another: what a receiver can attack."""
    schedule = result.summary.get("config", {}).get("schedule", {})
    return set(schedule.get("sync_layers", [])) | set(schedule.get("publisher_layers", []))


def worst_recovery(attack: dict, blocks: set[int], noise: float) -> tuple[float, int] | None:
    """The highest token recovery rate over the attacked blocks the run sends, at its noise level,
    and that block; None when the attack covered none of them at this noise."""
    rates = [
        (by_noise[key], int(block))
        for block, by_noise in attack.get("rate", {}).items()
        for key in by_noise
        if int(block) in blocks and float(key) == noise
    ]
    return max(rates) if rates else None


def plot_privacy(
    folders: list[Path | Result], attack_summaries: list[Path], out: Path, y: str = DEFAULT_METRIC
) -> Path | None:
    """Quality against leakage, one point per run: the leakage of a run is the best recovery rate
    ``fedattn attack`` measured at any block the run sends, through the run's K/V codec and at its
    ``--kv-noise`` (an attacker picks its best block; blocks the attack did not cover are not
    counted, so this is a lower bound)."""
    attacks = {}
    for path in attack_summaries:
        attack = json.loads(path.read_text(encoding="utf-8"))
        attacks[attack.get("config", {}).get("kv_codec")] = attack
    points = []
    for result in having(_as_results(folders), numbers=(y,)):
        if _is_reference(result):
            continue
        attack = attacks.get(result.settings.get("kv_codec"))
        worst = (
            None
            if attack is None
            else worst_recovery(attack, sent_blocks(result), float(result.settings.get("kv_noise", 0.0)))
        )
        if worst is None:
            skip(
                result.folder,
                f"no attack measured its sent blocks through codec {result.settings.get('kv_codec')} "
                "at its noise level",
            )
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
        axes.scatter(
            [rate], [result.get(y)], color="C0", zorder=3, label=f"{number}: {schedule_label(result)} (block {block})"
        )
        axes.annotate(str(number), (rate, result.get(y)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("tokens recovered by the attack (best sent block)")
    axes.set_ylabel(y)
    axes.set_xlim(-0.02, 1.02)
    axes.set_title(f"{y} vs leakage", fontsize=9)
    axes.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.set_size_inches(FRONTIER_SIZE)
    return save_figure(figure, out)


# -- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fedattn.argtypes import existing_path

    parser.add_argument(
        "results", nargs="+", type=existing_path, metavar="RESULTS", help="result folders (or folders holding them)"
    )
    parser.add_argument("--out", type=Path, default=Path("plots"), help="folder for the PNGs (default plots)")
    parser.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help=f"quality: a dotted path in summary.json such as em.average, or {DEFAULT_METRIC} "
        "(default: the publisher's EM of any benchmark)",
    )
    parser.add_argument(
        "--attack",
        type=Path,
        action="append",
        metavar="DIR",
        help="a `fedattn attack` folder (repeat for other codecs): also draw quality against leakage",
    )
    parser.add_argument(
        "--bytes-metric",
        default=DEFAULT_BYTES,
        help=f"communication per query: a dotted path, or {DEFAULT_BYTES} (default: bytes sent per query)",
    )


def _swept(results: list[Result], x: str) -> bool:
    """Whether some runs alike in everything else take two values of ``x`` (a line to draw)."""
    numeric = [result for result in results if _is_number(result.get(x))]
    return any(_distinct(group, x) > 1 for group in series(numeric, x).values())


def run(args: argparse.Namespace) -> int:
    """Draw every plot the folders support (a sweep needs two values of its parameter) and list them."""
    if not any(summary_files(path) for path in args.results):  # one line, rather than a skip for each path
        raise FedAttnError("no result folder with a summary.json among the given paths")
    results = load_results(args.results)
    if not results:
        raise FedAttnError("no readable summary.json among the given paths")
    folders = having(results, numbers=(args.metric,))
    written = []
    for x in SWEEPS:
        if _swept(folders, x):
            written.append(
                plot_vs_parameter(
                    folders, args.out / f"{args.metric}_vs_{x}.png", x, args.metric, True, args.bytes_metric
                )
            )
    for key in ABLATIONS:
        if _distinct(folders, key) > 1:
            written.append(plot_ablation(folders, args.out / f"{args.metric}_by_{key}.png", key, args.metric))
    written.append(plot_frontier(folders, args.out / f"{args.metric}_frontier.png", args.metric, args.bytes_metric))
    if args.attack:
        for folder in args.attack:
            if not (folder / "summary.json").is_file():
                raise FedAttnError(f"--attack {folder}: no summary.json (run fedattn attack --out {folder} first)")
        summaries = [folder / "summary.json" for folder in args.attack]
        written.append(plot_privacy(folders, summaries, args.out / f"{args.metric}_vs_leakage.png", args.metric))
    written = [path for path in written if path is not None]
    if not written:
        raise FedAttnError(
            f"nothing to plot: no folder carries {args.metric!r} (and {args.bytes_metric!r} for the frontier)"
        )
    for path in written:
        print(path)
    return 0
