"""``fedattn compare``: one Markdown table per task with the same columns for every system."""

import json

from test_plots import LAYERS, crossfacts_folder, gsm8k_folder, result_folder

from fedattn.cli.main import main
from fedattn.evaluation.harness import SUMMARY_FORMAT
from fedattn.systems.fedattn.schedule import every

HEADER = "| system | setting | model | items | em | bytes / query | time / query | leakage |"


def echo_folder(root, name: str, em: float, sent: float) -> None:
    """A second system's summary: the harness's shape, its own settings, nothing exposed."""
    result_folder(
        root,
        name,
        {
            "format": SUMMARY_FORMAT,
            "task": "gsm8k",
            "system": "echo",
            "config": {"task": {"name": "gsm8k"}, "system": {"name": "echo", "oracle": True}},
            "items": 7,
            "main_metric": "em",
            "metrics": {"em": em},
            "settings": {"shots": 4, "oracle": True},
            "setting": "oracle | echo",
            "reference": False,
            "exposure": None,
            "bytes_per_query": sent,
            "expected_bytes_per_query": sent,
            "time_per_query_s": 0.25,
        },
    )


def tables(text: str) -> dict[str, list[list[str]]]:
    """Each task's rows as cells (the header and the rule line dropped)."""
    found: dict[str, list[list[str]]] = {}
    task = None
    for line in text.splitlines():
        if line.startswith("## "):
            task = line[3:]
            found[task] = []
        elif line.startswith("| ") and task is not None and line != HEADER:
            found[task].append([cell.strip() for cell in line.strip("|").split(" | ")])
    return found


def test_one_row_per_system_and_setting_with_the_same_columns(tmp_path, capsys):
    runs = tmp_path / "runs"
    gsm8k_folder(runs, "h8", 4, every(8, LAYERS), 0.25, 1024.0)
    gsm8k_folder(runs, "h8-int8", 4, every(8, LAYERS), 0.2, 512.0, codec="int8")
    gsm8k_folder(runs, "central", 1, every(1, LAYERS), 0.6, 0)
    echo_folder(runs, "echo", 1.0, 2048.0)
    crossfacts_folder(runs, "cf-a", "federated", 0.5, 3000.0)
    crossfacts_folder(runs, "cf-b", "federated", 0.75, 3000.0)  # the same setting again: told apart by folder
    attack = result_folder(
        tmp_path, "attack", {"rate": {"0": {"0": 0.9}, "8": {"0": 0.4}}, "config": {"kv_codec": "float32"}}
    )
    out = tmp_path / "docs" / "comparison.md"
    assert main(["compare", str(runs), "--attack", str(attack), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    text = out.read_text()
    assert text.count(HEADER) == 2 and text.startswith("# Comparison across systems")
    rows = tables(text)
    assert rows["gsm8k"] == [
        ["echo", "oracle \\| echo", "", "7", "100.0%", "2.0 KB", "0.25 s", "nothing exposed"],
        ["fedattn", "centralized", "tiny-random", "100", "60.0%", "0 B", "1.50 s", "nothing exposed"],
        [
            "fedattn",
            "parties=4 sync_every=8 kv_codec=int8",
            "tiny-random",
            "100",
            "20.0%",
            "512 B",
            "1.50 s",
            "not measured",
        ],
        ["fedattn", "parties=4 sync_every=8", "tiny-random", "100", "25.0%", "1.0 KB", "1.50 s", "90.0% (block 0)"],
    ]
    assert [row[1] for row in rows["crossfacts"]] == ["parties=3 sync_every=4 (cf-a)", "parties=3 sync_every=4 (cf-b)"]
    assert [row[4] for row in rows["crossfacts"]] == ["50.0%", "75.0%"]


def test_without_out_the_table_is_printed(tmp_path, capsys):
    gsm8k_folder(tmp_path, "h8", 4, every(8, LAYERS), 0.25, 1024.0)
    assert main(["compare", str(tmp_path)]) == 0
    assert tables(capsys.readouterr().out)["gsm8k"][0][-1] == "not measured"


def test_nothing_to_compare_is_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["fedattn: error: no result folder with a summary.json among the given paths"]


def test_an_attack_folder_without_a_summary_is_refused(tmp_path, capsys):
    gsm8k_folder(tmp_path / "runs", "h8", 4, every(8, LAYERS), 0.25, 1024.0)
    assert main(["compare", str(tmp_path / "runs"), "--attack", str(tmp_path / "none")]) == 2
    assert "--attack" in capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "h8" / "summary.json").read_text())["task"] == "gsm8k"
