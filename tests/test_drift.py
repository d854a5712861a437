"""Drift against centralized inference on the tiny model: zero where FedAttn is exact (H = 1),
positive where the publisher sees only itself."""

import argparse
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import random_segments
from matplotlib import image

from fedattn.errors import FedAttnError
from fedattn.systems.fedattn.config import RunConfig, configure
from fedattn.systems.fedattn.drift import add_arguments, gsm8k_segments, mean_report, measure_drift, plot_drift, run
from fedattn.systems.fedattn.inprocess import run_in_process
from fedattn.systems.fedattn.schedule import Schedule, every

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEGMENTS = random_segments([7, 5, 6], seed=3)


def config(sync_layers: tuple[int, ...]) -> RunConfig:
    return RunConfig(schedule=Schedule(num_layers=8, sync_layers=sync_layers))


def test_every_block_global_matches_centralized(tiny):
    model, _ = tiny
    report = measure_drift(model, SEGMENTS, config(every(1, 8)))
    assert [party.tokens for party in report.parties] == [7, 5, 6]
    for party in report.parties:
        assert len(party.hidden) == len(party.key) == len(party.value) == 8
        assert max(party.hidden + party.key + party.value) < 1e-4
    assert report.kl_publisher < 1e-6


def test_local_only_drifts_for_the_publisher_but_not_the_first_party(tiny):
    model, _ = tiny
    report = measure_drift(model, SEGMENTS, config(()))
    first, publisher = report.parties[0], report.parties[-1]
    assert max(first.hidden + first.key + first.value) < 1e-4  # causality: nothing precedes it
    assert min(publisher.hidden) > 1e-3
    assert publisher.key[0] < 1e-4 and publisher.key[1] > 1e-3  # block 0 K/V depend on the token alone
    assert report.kl_publisher > 1e-4


def test_drift_plot_draws_a_line_per_party_and_the_sync_blocks(tiny, tmp_path):
    model, _ = tiny
    report = measure_drift(model, SEGMENTS, config(every(4, 8)))
    drawn = plot_drift(report, tmp_path / "drift.png", title="tiny")
    assert drawn.path.read_bytes()[:8] == PNG_SIGNATURE
    assert image.imread(drawn.path).shape[:2] == (400, 600)
    for party in report.parties:
        assert drawn.labelled(party.name).x == list(range(8)) and drawn.labelled(party.name).y == party.hidden
    sync = [entry.x for entry in drawn.series if entry.label.startswith("_")]  # the unlabelled vertical lines
    assert sync == [[0, 0], [4, 4]]


def parse(words: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(words)


def test_command_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "drift.png"
    words = ["--model", "tiny-random", "--device", "cpu", "--sync-every", "4", "--out", str(out)]
    assert run(parse(words + ["--context", "alpha beta gamma", "--question", "what?"])) == 0
    printed = capsys.readouterr().out
    assert "KL" in printed and "publisher" in printed and f"wrote {out}" in printed
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def gsm8k_words(items: str, out) -> list[str]:
    return [
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--gsm8k-item",
        items,
        "--parties",
        "3",
        "--shots",
        "1",
        "--json",
        "--out",
        str(out),
    ]


def reference_kl(words: list[str]) -> float:
    """KL(central || fed) of the publisher's next token, from scratch: the model's own forward over the
    whole prompt against the engine's first answer logits, by torch's kl_div (not drift's code)."""
    loaded, config, _ = configure(parse(words))
    segments = gsm8k_segments(loaded.tokenizer, 0, "TokEx", 3, 1)
    ids = torch.tensor([[token for segment in segments for token in segment]])
    with torch.inference_mode():
        central = loaded.model(input_ids=ids).logits[0, -1].double()
    federated = run_in_process(loaded.model, segments, replace(config, max_new_tokens=1, record_logits=True))
    log_fed = torch.log_softmax(federated.answer_logits[0].double(), dim=-1)
    log_central = torch.log_softmax(central, dim=-1)
    return float(F.kl_div(log_fed, log_central, log_target=True, reduction="sum"))


@pytest.mark.parametrize("sync_every", [1, 4])
def test_command_on_a_gsm8k_item(tmp_path, capsys, sync_every):
    """H = 1 is exact (KL ~0); every 4th block global drifts (KL clearly positive); both as computed by hand."""
    out = tmp_path / "gsm8k.png"
    words = gsm8k_words("0", out) + ["--sync-every", str(sync_every)]
    assert run(parse(words)) == 0
    document = json.loads(capsys.readouterr().out)
    assert [party["name"] for party in document["parties"]] == ["party-1", "party-2", "publisher"]
    expected = reference_kl(words)
    if sync_every == 1:
        assert abs(expected) < 1e-6 and document["kl_publisher"] < 1e-6
    else:
        assert expected > 1e-3
        assert document["kl_publisher"] == pytest.approx(expected, rel=1e-4)
    assert out.is_file()


def test_several_items_are_averaged_and_kept_resumably(tmp_path, capsys, monkeypatch):
    """--results keeps one record per item: a rerun with more items measures only the new ones."""
    from fedattn.systems.fedattn import drift

    measured = []
    real = drift.measure_drift
    monkeypatch.setattr(drift, "measure_drift", lambda *args: measured.append(args[1]) or real(*args))
    results = tmp_path / "results"
    assert run(parse(gsm8k_words("0-1", tmp_path / "a.png") + ["--results", str(results)])) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(measured) == 2
    assert run(parse(gsm8k_words("0-2", tmp_path / "b.png") + ["--results", str(results)])) == 0
    both = json.loads(capsys.readouterr().out)
    assert len(measured) == 3  # items 0 and 1 came from the folder
    records = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    assert [record["key"] for record in records] == ["0", "1", "2"]
    reports = [drift.report_from_json(record) for record in records]
    assert first["kl_publisher"] == pytest.approx(mean_report(reports[:2]).kl_publisher)
    assert both["kl_publisher"] == pytest.approx(sum(report.kl_publisher for report in reports) / 3)
    publisher = [report.parties[-1] for report in reports]
    assert both["parties"][-1]["hidden"] == pytest.approx(
        [sum(values) / 3 for values in zip(*(p.hidden for p in publisher))]
    )
    assert both["parties"][-1]["tokens"] == sum(party.tokens for party in publisher)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["items"] == 3 and summary["kl_publisher"] == pytest.approx(both["kl_publisher"])
    with pytest.raises(FedAttnError, match=r"differs in gsm8k\.parties"):
        run(parse(gsm8k_words("0", tmp_path / "c.png") + ["--results", str(results), "--parties", "2"]))


@pytest.mark.parametrize(
    "items, message",
    [
        ("1319", "GSM8K test items are 0..1318, got 1319"),
        ("x", "expected K, a range K-M or a list of them, got 'x'"),
        ("3-1", "GSM8K test items are 0..1318, got 3-1"),
    ],
)
def test_bad_items_are_refused(tmp_path, capsys, items, message):
    from fedattn.cli.main import main

    assert main(["eval", "drift", *gsm8k_words(items, tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == f"fedattn: error: argument --gsm8k-item: {message}\n"


def test_command_needs_a_prompt(tmp_path):
    with pytest.raises(FedAttnError, match="--question"):
        run(parse(["--model", "tiny-random", "--device", "cpu", "--out", str(tmp_path / "x.png")]))
