"""A sweep over a two-point grid runs each point with its own values, writes each point's records
and a plot that is a valid PNG."""

import argparse
import json

import pytest

from fedattn.argtypes import option_words
from fedattn.cli.main import main, parse_words
from fedattn.evaluation import sweep
from fedattn.evaluation.sweep import load_sweep, points

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
        # the point ran with its own H (the default, 4, would sync blocks 0 and 4 of the 8)
        stored = json.loads((folder / "config.json").read_text())
        system = stored["system"]
        assert system["schedule"]["sync_layers"] == list(range(0, 8, h))
        assert (stored["task"]["shots"], system["parties"], system["max_new_tokens"]) == (1, 2, 4)
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


def test_each_point_is_dispatched_with_its_own_values(tmp_path, capsys):
    """The words a point prints are the words it runs: every grid value and base option reaches the
    parsed command, and its folder is the point's own."""
    config = tmp_path / "s.toml"
    config.write_text(
        f'benchmark = "crossfacts"\nout = "{tmp_path}"\nplot = true\n'
        '[base]\nmodel = "tiny-random"\nratio_comm = 0.5\n[grid]\nsync_every = [2, 4]\nparties = [3, 4]\n'
    )
    dispatched: list[argparse.Namespace] = []

    def dispatch(args: argparse.Namespace) -> int:
        dispatched.append(args)
        if args.command == "eval":  # what a run leaves, so that the plot step parses
            args.out.mkdir(parents=True)
        return 0

    assert sweep.run(parse_words(["sweep", str(config)]), parse_words, dispatch) == 0
    runs, plot = dispatched[:-1], dispatched[-1]
    assert [(args.sync_every, args.parties) for args in runs] == [(2, 3), (4, 3), (2, 4), (4, 4)]
    for args in runs:
        assert (args.command, args.benchmark, args.model, args.ratio_comm) == ("eval", "crossfacts", "tiny-random", 0.5)
        assert args.out == tmp_path / f"parties={args.parties},sync_every={args.sync_every}"
    assert plot.command == "plot" and plot.results == [args.out for args in runs]
    announced = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== fedattn eval")]
    assert [parse_words(line.split()[2:]) for line in announced] == runs


def test_a_failing_point_stops_the_sweep(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text(f'benchmark = "gsm8k"\nout = "{tmp_path}"\n[grid]\nsync_every = [2, 4]\n')
    dispatched = []
    assert sweep.run(parse_words(["sweep", str(config)]), parse_words, lambda args: dispatched.append(args) or 3) == 3
    assert len(dispatched) == 1


@pytest.mark.parametrize(
    "text,message",
    [("benchmark = 'nope'\nout='x'", "benchmark"), ("benchmark='gsm8k'", "'out'"), ("[[", "not valid TOML")],
)
def test_bad_sweep_files(tmp_path, capsys, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert main(["sweep", str(config)]) == 2
    assert message in capsys.readouterr().err
