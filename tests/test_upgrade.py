"""``fedattn results upgrade`` on folders the code wrote before the harness (tests/data/legacy, made at
0539040): the converted summary is what the harness writes for the same command today, and the
folders plot and compare again."""

import json
import shutil
from pathlib import Path

import pytest

from fedattn.cli.main import main
from fedattn.evaluation.plots import load_results, plot_vs_parameter

LEGACY = Path(__file__).parent / "data" / "legacy"
GSM8K = ["--model", "tiny-random", "--device", "cpu", "--limit", "2", "--shots", "1", "--parties", "3"]
GSM8K += ["--max-new-tokens", "4", "--every-answer"]  # the commands of tests/data/legacy/README.md
CROSSFACTS = ["--model", "tiny-random", "--device", "cpu", "--count", "2", "--facts", "2", "--max-new-tokens", "4"]
COMPARED = ("task", "system", "config", "items", "main_metric", "metrics", "settings", "setting", "reference")
COMPARED += ("exposure", "bytes_per_query", "expected_bytes_per_query")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def legacy(tmp_path) -> Path:
    copy = tmp_path / "legacy"
    shutil.copytree(LEGACY, copy)
    return copy


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_every_folder_is_upgraded_once_and_the_earlier_summary_kept(legacy, capsys):
    originals = {folder.name: (folder / "summary.json").read_text() for folder in legacy.iterdir() if folder.is_dir()}
    assert main(["results", "upgrade", str(legacy)]) == 0
    said = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert said[str(legacy / "attack-float32")] == "an attack's folder: current"
    assert said[str(legacy / "gsm8k-tokex-n3")].startswith("upgraded (gsm8k")
    assert said[str(legacy / "crossfacts-federated")].startswith("upgraded (crossfacts")
    for name, text in originals.items():
        if name != "attack-float32":
            assert (legacy / name / "summary.v1.json").read_text() == text
            assert summary(legacy / name)["format"] == 2
    assert (legacy / "attack-float32" / "summary.json").read_text() == originals["attack-float32"]
    upgraded = {name: (legacy / name / "summary.json").read_text() for name in originals}
    assert main(["results", "upgrade", str(legacy / "gsm8k-tokex-n3")]) == 0
    assert capsys.readouterr().out.strip().endswith(": already current")
    assert {name: (legacy / name / "summary.json").read_text() for name in originals} == upgraded


@pytest.mark.parametrize(
    ("folder", "command"),
    [("gsm8k-tokex-n3", ["eval", "gsm8k", *GSM8K]), ("crossfacts-federated", ["eval", "crossfacts", *CROSSFACTS])],
)
def test_the_upgrade_is_what_the_harness_writes_for_the_same_command(legacy, tmp_path, capsys, folder, command):
    assert main(["results", "upgrade", str(legacy / folder)]) == 0
    assert main([*command, "--out", str(tmp_path / "now")]) == 0
    capsys.readouterr()
    upgraded, now = summary(legacy / folder), summary(tmp_path / "now")
    assert {key: upgraded[key] for key in COMPARED} == {key: now[key] for key in COMPARED}
    assert upgraded["time_per_query_s"] > 0


def test_upgraded_folders_plot_and_compare(legacy, tmp_path, capsys):
    assert main(["results", "upgrade", str(legacy)]) == 0
    capsys.readouterr()
    results = load_results([legacy / "gsm8k-tokex-n3", legacy / "gsm8k-tokex-n3-h2"])
    drawn = plot_vs_parameter(results, tmp_path / "h.png", x="sync_every", y="em")
    earlier = [
        json.loads((legacy / name / "summary.v1.json").read_text()) for name in ("gsm8k-tokex-n3-h2", "gsm8k-tokex-n3")
    ]
    traffic = drawn.labelled("parties=3 (bytes_per_query)")
    assert traffic.x == [2, 4] and traffic.y == [document["bytes"]["mean_sent_per_query"] for document in earlier]
    assert drawn.labelled("parties=3").y == [document["em"]["publisher"] for document in earlier]
    out = tmp_path / "plots"
    attack = legacy / "attack-float32"
    assert main(["plot", str(legacy), "--attack", str(attack), "--out", str(out)]) == 0
    assert {Path(path).name for path in capsys.readouterr().out.split()} == {
        "em_vs_sync_every.png",
        "em_frontier.png",
        "em_vs_leakage.png",
    }
    assert main(["compare", str(legacy), "--attack", str(attack), "--out", str(tmp_path / "comparison.md")]) == 0
    table = (tmp_path / "comparison.md").read_text()
    assert "## gsm8k" in table and "## crossfacts" in table
    assert "| fedattn | centralized | tiny-random | 2 | 0.0% | 0 B |" in table


def test_an_earlier_folder_cannot_be_resumed_and_says_why(legacy, capsys):
    code = main(["eval", "gsm8k", *GSM8K, "--out", str(legacy / "gsm8k-tokex-n3")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds results of an earlier fedattn" in err and "fedattn results upgrade" in err


def test_a_summary_that_is_not_json_is_named(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{oops")
    assert main(["results", "upgrade", str(tmp_path)]) == 2
    assert f"{tmp_path / 'summary.json'} is not readable JSON" in capsys.readouterr().err
