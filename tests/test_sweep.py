"""A sweep over a two-point grid writes each point's records and a plot that is a valid PNG."""

import json

import pytest

from fedattn.cli.main import main
from fedattn.evaluation.sweep import load_sweep, option_words, points

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_two_point_grid_writes_records_and_a_png(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text(
        f"""
benchmark = "gsm8k"
out = "{tmp_path / "results"}"
plot = true

[base]
model = "tiny-random"
limit = 1
shots = 1
parties = 2
max_new_tokens = 4

[grid]
sync_every = [1, 2]
"""
    )
    assert main(["sweep", str(config)]) == 0
    for h in (1, 2):
        folder = tmp_path / "results" / f"sync_every={h}"
        records = (folder / "records.jsonl").read_text().splitlines()
        assert len(records) == 1 and json.loads(records[0])["key"]
        assert json.loads((folder / "summary.json").read_text())["config"]
    pngs = sorted((tmp_path / "results" / "plots").glob("*.png"))
    assert pngs and all(png.read_bytes()[:8] == PNG_SIGNATURE for png in pngs)
    assert main(["sweep", str(config)]) == 0  # resumes: nothing left to do, same records
    assert len((tmp_path / "results" / "sync_every=1" / "records.jsonl").read_text().splitlines()) == 1


def test_grid_expansion_and_option_words(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text(
        'benchmark = "gsm8k"\nout = "x"\n[base]\nall_answers = true\n[grid]\nsync_every = [2, 4]\nparties = [3, 4]\n'
    )
    sweep = load_sweep(config)
    assert len(points(sweep)) == 4
    assert option_words({"sync_every": 4, "all_answers": True, "raw": False}) == ["--sync-every", "4", "--all-answers"]


@pytest.mark.parametrize(
    "text,message",
    [("benchmark = 'nope'\nout='x'", "benchmark"), ("benchmark='gsm8k'", "'out'"), ("[[", "not valid TOML")],
)
def test_bad_sweep_files(tmp_path, capsys, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert main(["sweep", str(config)]) == 2
    assert message in capsys.readouterr().err
