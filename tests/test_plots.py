"""The result plots from hand-made result folders: the series each figure draws (read back from the
figure itself), settings recovered from the stored schedule, and folders lacking a value skipped
with a message."""

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from matplotlib import image

from fedattn.errors import FedAttnError
from fedattn.evaluation.harness import SUMMARY_FORMAT, described
from fedattn.evaluation.plots import (
    MISSING,
    Result,
    add_arguments,
    attack_recoveries,
    load_results,
    plot_ablation,
    plot_frontier,
    plot_privacy,
    plot_training,
    plot_vs_parameter,
    run,
    worst_recovery,
)
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.exchange import Exchange
from fedattn.systems.fedattn.schedule import Schedule, every, placement
from fedattn.systems.fedattn.system import SYSTEM, FedAttnSetup

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = 24


def system_config(parties: int | None, sync_layers, publisher_layers=(), noise=0.0, codec="float32", mode=None) -> dict:
    """The configuration FedAttn stores for a run, as JSON reads it back."""
    from fedattn.network.kv_codec import get_codec

    config = RunConfig(
        schedule=Schedule(LAYERS, tuple(sync_layers), tuple(publisher_layers)),
        codec=get_codec(codec),
        exchange=Exchange(noise=noise),
    )
    loaded = SimpleNamespace(name="tiny-random", identity="abc")
    split = None if mode else "TokEx"
    setup = FedAttnSetup(loaded, config, "cpu", "float32", False, split=split, parties=parties, mode=mode)
    return json.loads(json.dumps({"name": "fedattn", **SYSTEM.config_json(setup)}))


def summary(config: dict, task_settings: dict, em: float | None, sent: float | None, task: str = "gsm8k") -> dict:
    """A summary of the harness's shape (the fields plots read)."""
    metrics = {} if em is None else {"em": em}
    return {
        "format": SUMMARY_FORMAT,
        "task": task,
        "system": "fedattn",
        "config": {"task": {"name": task}, "system": config},
        "items": 100,
        "main_metric": "em",
        "metrics": metrics,
        **described(SYSTEM, config, task_settings),
        "bytes_per_query": sent,
        "expected_bytes_per_query": sent,
        "time_per_query_s": 1.5,
    }


def result_folder(root: Path, name: str, document: dict) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(document))
    return folder


def gsm8k_folder(
    root: Path, name: str, parties: int, sync_layers, em: float | None, sent: float | None, **options
) -> Path:
    return result_folder(root, name, summary(system_config(parties, sync_layers, **options), {"shots": 4}, em, sent))


def crossfacts_folder(root: Path, name: str, mode: str, em: float, sent: float) -> Path:
    config = system_config(None, every(4, LAYERS), mode=mode)
    return result_folder(root, name, summary(config, {"source": "crossfacts", "parties": 3}, em, sent, "crossfacts"))


def assert_png(drawn) -> None:
    assert drawn is not None and drawn.path.read_bytes()[:8] == PNG_SIGNATURE
    width = 900 if drawn.path.name.endswith(("frontier.png", "leak.png")) else 600  # legend beside the axes
    assert image.imread(drawn.path).shape[:2] == (400, width)


@pytest.fixture
def sweep(tmp_path) -> list[Path]:
    """An H sweep at N = 4, a placement variant of the H = 8 point, and a centralized run."""
    return [
        gsm8k_folder(tmp_path, "h2", 4, every(2, LAYERS), 0.5, 4096.0),
        gsm8k_folder(tmp_path, "h8", 4, every(8, LAYERS), 0.25, 1024.0),
        gsm8k_folder(tmp_path, "deep", 4, placement("deep-half", 3, LAYERS), 0.3, 1024.0),
        gsm8k_folder(tmp_path, "central", 1, every(1, LAYERS), 0.6, 0),
    ]


def test_settings_are_recovered_from_the_stored_schedule(sweep):
    h8, deep = load_results(sweep[1:3])
    assert (h8.get("sync_every"), h8.get("placement"), h8.get("parties"), h8.get("model")) == (
        8,
        "every",
        4,
        "tiny-random",
    )
    assert (deep.get("placement"), deep.get("sync_blocks"), deep.get("ratio_comm")) == ("deep-half", 3, 1.0)
    assert deep.get("sync_every") is MISSING
    assert (h8.get("em"), h8.get("bytes_per_query"), h8.get("shots")) == (0.25, 1024.0, 4)


def test_a_task_that_holds_the_parties_resolves_too(tmp_path):
    (result,) = load_results([crossfacts_folder(tmp_path, "cf", "federated", 0.75, 10.0)])
    assert (result.get("em"), result.get("bytes_per_query"), result.get("parties"), result.get("mode")) == (
        0.75,
        10.0,
        3,
        "federated",
    )


def test_the_h_sweep_draws_one_line_its_bytes_and_the_centralized_reference(sweep, tmp_path, capsys):
    drawn = plot_vs_parameter(sweep, tmp_path / "h.png", x="sync_every", y="em")
    assert_png(drawn)
    line = drawn.labelled("parties=4")  # the sweep's label without the swept sync_every
    assert (line.kind, line.x, line.y, line.axis) == ("line", [2, 8], [0.5, 0.25], 0)
    traffic = drawn.labelled("parties=4 (bytes_per_query)")
    assert (traffic.x, traffic.y, traffic.axis) == ([2, 8], [4096.0, 1024.0], 1)
    reference = drawn.labelled("centralized")
    assert reference.y == [0.6, 0.6]  # a horizontal line at the centralized EM
    assert len(drawn.series) == 3
    assert "skipping" in capsys.readouterr().err  # the placement run has no H


def test_the_n_sweep_draws_the_runs_alike_but_in_n(sweep, tmp_path):
    assert plot_vs_parameter(sweep, tmp_path / "none.png", x="parties") is None  # no two runs alike but in N
    n2 = gsm8k_folder(tmp_path, "n2", 2, every(8, LAYERS), 0.4, 512.0)  # with h8: N = 2 and 4 at H = 8
    drawn = plot_vs_parameter(sweep + [n2], tmp_path / "n.png", x="parties", bytes_axis=False)
    assert_png(drawn)
    (line,) = [entry for entry in drawn.series if entry.kind == "line" and entry.label != "centralized"]
    assert (line.label, line.x, line.y) == ("sync_every=8", [2, 4], [0.4, 0.25])


def test_the_placement_ablation_compares_the_runs_alike_but_in_placement(sweep, tmp_path):
    drawn = plot_ablation(sweep, tmp_path / "placement.png", key="placement", y="em")
    assert_png(drawn)
    (bars,) = drawn.series
    assert (bars.kind, bars.x, bars.y) == ("bars", ["deep-half", "every"], [0.3, 0.25])  # h8 and deep: 3 blocks each


def test_the_frontier_has_a_point_per_run_and_a_line_for_the_one_sending_nothing(sweep, tmp_path):
    drawn = plot_frontier(sweep, tmp_path / "frontier.png", y="em")
    assert_png(drawn)
    points = {entry.label: (entry.x, entry.y) for entry in drawn.series if entry.kind == "points"}
    assert points == {
        "1: parties=4 sync_every=2": ([4096.0], [0.5]),
        "2: parties=4 sync_every=8": ([1024.0], [0.25]),
        "3: parties=4 placement=deep-half sync_blocks=3": ([1024.0], [0.3]),
    }
    assert drawn.labelled("centralized (0 bytes)").y == [0.6, 0.6]


def test_a_folder_without_the_metric_is_skipped_with_a_message(sweep, tmp_path, capsys):
    partial = gsm8k_folder(tmp_path, "partial", 4, every(4, LAYERS), None, 2048.0)
    drawn = plot_vs_parameter(sweep + [partial], tmp_path / "h.png", y="em")
    assert f"skipping {partial}: no 'em'" in capsys.readouterr().err
    assert drawn.labelled("parties=4").x == [2, 8]  # drawn without it
    assert plot_frontier([partial], tmp_path / "none.png", y="em") is None
    assert not (tmp_path / "none.png").exists()


def test_unreadable_empty_earlier_and_attack_folders_are_skipped(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    empty = tmp_path / "empty"
    empty.mkdir()
    earlier = result_folder(tmp_path, "earlier", {"em": {"publisher": 0.5}, "config": {"task": "gsm8k-test"}})
    attack = result_folder(tmp_path, "attack", {"rate": {"0": {"0": 1.0}}, "config": {"kv_codec": "float32"}})
    assert load_results([broken, empty, earlier, attack]) == []
    err = capsys.readouterr().err
    assert "unreadable summary.json" in err and "no summary.json" in err
    assert (
        f"skipping {earlier}: a summary of an earlier fedattn (convert it once: fedattn results upgrade {earlier})"
        in err
    )
    assert f"skipping {attack}: an attack's folder (give it with --attack)" in err


def parse(words: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(words)


def test_command_draws_what_the_folders_support(sweep, tmp_path, capsys):
    out = tmp_path / "plots"
    assert run(parse([str(tmp_path), "--out", str(out)])) == 0  # a parent folder: found below it
    listed = capsys.readouterr().out.split()
    # no N sweep: the 1-party run differs from the others in more than the number of parties
    expected = {"em_vs_sync_every.png", "em_by_placement.png", "em_frontier.png"}
    assert {Path(path).name for path in listed} == expected
    for path in listed:
        assert Path(path).read_bytes()[:8] == PNG_SIGNATURE


def test_command_with_nothing_to_plot_says_so(sweep, tmp_path):
    with pytest.raises(FedAttnError, match="nothing to plot"):
        run(parse([str(path) for path in sweep] + ["--metric", "accuracy", "--out", str(tmp_path / "plots")]))


def test_runs_that_are_not_federated_are_labelled_by_their_mode(tmp_path):
    (result,) = load_results([crossfacts_folder(tmp_path, "c", "centralized", 0.75, 0)])
    assert result.label == "centralized" and result.reference
    assert result.get("sync_every") is MISSING and result.get("kv_codec") is MISSING  # nothing is exchanged


def test_a_one_party_run_has_no_schedule_and_is_the_reference_line_against_h(sweep, tmp_path, capsys):
    (central,) = load_results([sweep[3]])
    assert central.get("sync_every") is MISSING and central.label == "centralized"
    drawn = plot_vs_parameter(sweep, tmp_path / "h.png", x="sync_every")
    assert "central" not in capsys.readouterr().err  # drawn as the reference, not skipped
    assert drawn.labelled("centralized").kind == "line"


def test_a_publisher_only_schedule_has_no_sync_interval(tmp_path):
    folder = gsm8k_folder(tmp_path, "pdense", 4, (), 0.3, 100.0, publisher_layers=range(LAYERS))
    (result,) = load_results([folder])
    assert result.get("sync_every") is MISSING and result.get("placement") is MISSING
    assert result.label == "parties=4 sync_blocks=0 publisher_layers=dense"


def test_leakage_is_the_best_attacked_block_the_run_sends(tmp_path, capsys):
    attack = {"rate": {"0": {"0": 1.0, "0.3": 0.3}, "8": {"0": 0.4, "0.3": 0.35}}, "config": {"kv_codec": "float32"}}
    h8 = gsm8k_folder(tmp_path / "runs", "h8", 4, every(8, LAYERS), 0.25, 1024.0)  # sends 0, 8, 16
    dense = gsm8k_folder(tmp_path / "runs", "dense-noise", 4, (), 0.2, 99.0, publisher_layers=range(LAYERS), noise=0.3)
    late = gsm8k_folder(tmp_path / "runs", "late", 4, (16,), 0.1, 512.0)  # a block the attack did not cover
    results = load_results([h8, dense, late])
    recoveries = attack_recoveries(attack)
    assert [worst_recovery(recoveries, result.summary["exposure"]) for result in results] == [(1.0, 0), (0.35, 8), None]
    drawn = plot_privacy([h8, dense, late], recoveries, tmp_path / "leak.png")
    assert_png(drawn)
    points = {entry.label: (entry.x, entry.y) for entry in drawn.series}
    assert points == {
        "1: parties=4 sync_every=8 (block 0)": ([1.0], [0.25]),
        "2: parties=4 sync_blocks=0 publisher_layers=dense kv_noise=0.3 (block 8)": ([0.35], [0.2]),
    }
    assert f"skipping {late}" in capsys.readouterr().err
    int8 = gsm8k_folder(tmp_path / "runs", "h8-int8", 4, every(8, LAYERS), 0.2, 512.0, codec="int8")
    assert plot_privacy([int8], recoveries, tmp_path / "none.png") is None  # float32 frames say nothing of int8
    assert "through codec int8" in capsys.readouterr().err
    assert Result(int8, json.loads((int8 / "summary.json").read_text())).label == "parties=4 sync_every=8 kv_codec=int8"


def test_a_training_run_is_drawn_as_its_losses_per_step(tmp_path, capsys):
    """--training DIR alone: the held-out losses (every few steps) and the batches' losses of its
    log.jsonl, as written there; a log that is not JSON lines is refused in one line."""
    run_dir = tmp_path / "train"
    run_dir.mkdir()
    records = [
        {"step": 0, "held_out_loss": 0.9},
        {"step": 1, "train_loss": 0.7},
        {"step": 2, "train_loss": 0.5, "held_out_loss": 0.6},
    ]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path / "plots"
    assert run(parse(["--training", str(run_dir), "--out", str(out)])) == 0
    assert capsys.readouterr().out.split() == [str(out / "training_loss.png")]
    drawn = plot_training([run_dir], tmp_path / "again.png")
    lines = {series.label: (series.x, series.y) for series in drawn.series}
    assert lines == {"train": ([0, 2], [0.9, 0.6]), "train (training batches)": ([1, 2], [0.7, 0.5])}
    (run_dir / "log.jsonl").write_text("{not json\n")
    with pytest.raises(FedAttnError, match="cannot read .*log.jsonl as a training log"):
        run(parse(["--training", str(run_dir), "--out", str(out)]))
    with pytest.raises(FedAttnError, match="give result folders, or --training DIR"):
        run(parse(["--out", str(out)]))
