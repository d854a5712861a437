"""The result plots from hand-written summary.json folders: valid PNGs, and folders lacking a
value are skipped with a message."""

import argparse
import json
from pathlib import Path

import pytest
from matplotlib import image

from fedattn.errors import FedAttnError
from fedattn.plots import add_arguments, load_results, plot_ablation, plot_frontier, plot_vs_parameter, run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def result_folder(root: Path, name: str, config: dict, **metrics) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(metrics | {"config": config}))
    return folder


def assert_png(path: Path | None) -> None:
    assert path is not None and path.read_bytes()[:8] == PNG_SIGNATURE
    assert image.imread(path).shape[:2] == (400, 600)


@pytest.fixture
def sweep(tmp_path) -> list[Path]:
    """Two points of an H sweep, a placement variant, and a centralized run."""
    base = {"model": "tiny-random", "parties": 4, "placement": None}
    return [
        result_folder(tmp_path, "h2", base | {"sync_every": 2}, em_publisher=0.5, mean_bytes_sent=4096.0),
        result_folder(tmp_path, "h8", base | {"sync_every": 8}, em_publisher=0.25, mean_bytes_sent=1024.0),
        result_folder(tmp_path, "deep", base | {"sync_every": 8, "placement": "deep-half"}, em_publisher=0.3, mean_bytes_sent=1024.0),
        result_folder(tmp_path, "central", {"model": "tiny-random", "parties": 1, "sync_every": 1, "placement": None}, em_publisher=0.6, mean_bytes_sent=0),
    ]


def test_each_plot_is_a_png(sweep, tmp_path):
    assert_png(plot_vs_parameter(sweep, tmp_path / "h.png", x="sync_every", y="em_publisher"))
    assert_png(plot_vs_parameter(sweep, tmp_path / "n.png", x="parties", bytes_axis=False))
    assert_png(plot_ablation(sweep, tmp_path / "placement.png", key="placement"))
    assert_png(plot_frontier(sweep, tmp_path / "frontier.png"))


def test_a_folder_without_the_metric_is_skipped_with_a_message(sweep, tmp_path, capsys):
    partial = result_folder(tmp_path, "partial", {"sync_every": 4}, mean_bytes_sent=2048.0)
    assert_png(plot_vs_parameter(sweep + [partial], tmp_path / "h.png"))
    assert f"skipping {partial}: no 'em_publisher'" in capsys.readouterr().err
    assert plot_frontier([partial], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_unreadable_and_empty_folders_are_skipped(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_results([broken, empty]) == []
    err = capsys.readouterr().err
    assert "unreadable summary.json" in err and "no summary.json" in err


def parse(words: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(words)


def test_command_draws_what_the_folders_support(sweep, tmp_path, capsys):
    out = tmp_path / "plots"
    assert run(parse([str(tmp_path), "--out", str(out)])) == 0  # a parent folder: found below it
    listed = capsys.readouterr().out.split()
    # no N sweep: the 1-party run differs from the others in more than the number of parties
    expected = {"em_publisher_vs_sync_every.png", "em_publisher_by_placement.png", "em_publisher_frontier.png"}
    assert {Path(path).name for path in listed} == expected
    for path in listed:
        assert_png(Path(path))


def test_command_with_nothing_to_plot_says_so(sweep, tmp_path):
    with pytest.raises(FedAttnError, match="nothing to plot"):
        run(parse([str(path) for path in sweep] + ["--metric", "accuracy", "--out", str(tmp_path / "plots")]))
