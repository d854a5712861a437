"""The result plots from hand-written result folders: valid PNGs, settings recovered from the
stored schedule, and folders lacking a value skipped with a message."""

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from matplotlib import image

from fedattn.errors import FedAttnError
from fedattn.evaluation.eval_gsm8k import run_configuration
from fedattn.evaluation.plots import (
    MISSING,
    Result,
    add_arguments,
    load_results,
    plot_ablation,
    plot_frontier,
    plot_privacy,
    plot_vs_parameter,
    run,
    schedule_label,
    sent_blocks,
    worst_recovery,
)
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.schedule import Schedule, every, placement

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = 24


def gsm8k_config(parties: int, sync_layers: tuple[int, ...]) -> dict:
    """The configuration ``fedattn eval gsm8k`` stores, as JSON reads it back."""
    args = SimpleNamespace(dtype="float32", split="TokEx", parties=parties, shots=4)
    loaded = SimpleNamespace(name="tiny-random", identity="abc")
    config = run_configuration(args, loaded, RunConfig(schedule=Schedule(LAYERS, sync_layers)))
    return json.loads(json.dumps(config))


def result_folder(root: Path, name: str, summary: dict) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def gsm8k_folder(root: Path, name: str, parties: int, sync_layers: tuple[int, ...], em: float, sent: float) -> Path:
    summary = {
        "em": {"publisher": em, "average": em},
        "bytes": {"mean_sent_per_query": sent},
        "config": gsm8k_config(parties, sync_layers),
    }
    return result_folder(root, name, summary)


def assert_png(path: Path | None) -> None:
    assert path is not None and path.read_bytes()[:8] == PNG_SIGNATURE
    width = 900 if path.name.endswith(("frontier.png", "leak.png")) else 600  # legend beside the axes
    assert image.imread(path).shape[:2] == (400, width)


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
    h8, deep = (Result(folder, json.loads((folder / "summary.json").read_text())) for folder in sweep[1:3])
    assert (h8.get("sync_every"), h8.get("placement"), h8.get("parties"), h8.get("model")) == (
        8,
        "every",
        4,
        "tiny-random",
    )
    assert (deep.get("placement"), deep.get("sync_blocks"), deep.get("ratio_comm")) == ("deep-half", 3, 1.0)
    assert (h8.get("em_publisher"), h8.get("bytes_per_query")) == (0.25, 1024.0)


def test_crossfacts_summary_names_resolve_too(tmp_path):
    folder = result_folder(tmp_path, "cf", {"em": 0.75, "mean_bytes_sent": 10.0, "config": {"parties": 3}})
    (result,) = load_results([folder])
    assert (result.get("em_publisher"), result.get("bytes_per_query"), result.get("parties")) == (0.75, 10.0, 3)


def test_each_plot_is_a_png(sweep, tmp_path):
    assert_png(plot_vs_parameter(sweep, tmp_path / "h.png", x="sync_every", y="em_publisher"))
    assert plot_vs_parameter(sweep, tmp_path / "none.png", x="parties") is None  # no two runs alike but in N
    n2 = gsm8k_folder(tmp_path, "n2", 2, every(8, LAYERS), 0.4, 512.0)  # with h8: N = 2 and 4 at H = 8
    assert_png(plot_vs_parameter(sweep + [n2], tmp_path / "n.png", x="parties", bytes_axis=False))
    assert_png(plot_ablation(sweep, tmp_path / "placement.png", key="placement"))
    assert_png(plot_frontier(sweep, tmp_path / "frontier.png"))


def test_a_folder_without_the_metric_is_skipped_with_a_message(sweep, tmp_path, capsys):
    partial = result_folder(
        tmp_path, "partial", {"bytes": {"mean_sent_per_query": 2048.0}, "config": gsm8k_config(4, every(4, LAYERS))}
    )
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


def test_runs_that_are_not_federated_are_labelled_by_their_mode(tmp_path):
    summary = {"em": 0.75, "mean_bytes_sent": 0, "config": {"mode": "centralized", "parties": 3}}
    result = load_results([result_folder(tmp_path, "c", summary)])[0]
    assert schedule_label(result) == "centralized"


def test_a_one_party_run_has_no_schedule_and_is_the_reference_line_against_h(sweep, tmp_path, capsys):
    central = load_results([sweep[3]])[0]
    assert central.get("sync_every") is MISSING and schedule_label(central) == "centralized"
    assert_png(plot_vs_parameter(sweep, tmp_path / "h.png", x="sync_every"))
    assert "central" not in capsys.readouterr().err  # drawn as the reference, not skipped


def test_a_publisher_only_schedule_has_no_sync_interval(tmp_path):
    config = gsm8k_config(4, ())
    config["schedule"]["publisher_layers"] = list(range(LAYERS))
    (result,) = load_results([result_folder(tmp_path, "pdense", {"em": {"publisher": 0.3}, "config": config})])
    assert result.get("sync_every") is MISSING and result.get("placement") is MISSING
    assert schedule_label(result) == "parties=4 sync_blocks=0 publisher_layers=dense"


def test_leakage_is_the_best_attacked_block_the_run_sends(tmp_path, capsys):
    attack = tmp_path / "attack" / "summary.json"
    attack.parent.mkdir()
    attack.write_text(
        json.dumps(
            {"rate": {"0": {"0": 1.0, "0.3": 0.3}, "8": {"0": 0.4, "0.3": 0.35}}, "config": {"kv_codec": "float32"}}
        )
    )
    h8 = gsm8k_folder(tmp_path / "runs", "h8", 4, every(8, LAYERS), 0.25, 1024.0)  # sends 0, 8, 16
    noisy = gsm8k_config(4, ())
    noisy["schedule"]["publisher_layers"] = list(range(LAYERS))
    noisy["kv_exchange"] = {"select": "random", "noise": 0.3, "budget": None}
    dense = result_folder(tmp_path / "runs", "dense-noise", {"em": {"publisher": 0.2}, "config": noisy})
    late = gsm8k_folder(tmp_path / "runs", "late", 4, (16,), 0.1, 512.0)  # a block the attack did not cover
    summary = json.loads(attack.read_text())
    results = load_results([h8, dense, late])
    assert [worst_recovery(summary, sent_blocks(result), float(result.get("kv_noise"))) for result in results] == [
        (1.0, 0),
        (0.35, 8),
        None,
    ]
    assert_png(plot_privacy([h8, dense, late], [attack], tmp_path / "leak.png"))
    assert "skipping" in capsys.readouterr().err
    quantized = gsm8k_config(4, every(8, LAYERS))
    quantized["kv_codec"] = "int8"  # the attack went through float32 frames: it says nothing about int8 ones
    int8 = result_folder(tmp_path / "runs", "h8-int8", {"em": {"publisher": 0.2}, "config": quantized})
    assert plot_privacy([int8], [attack], tmp_path / "none.png") is None
    assert "through codec int8" in capsys.readouterr().err
    assert schedule_label(results[1]) == "parties=4 sync_blocks=0 publisher_layers=dense kv_noise=0.3"
