"""SpecFed through the shared harness (``fedattn eval gsm8k --system specfed``), the comparison
table and the system's description of its stored configurations."""

import json

from fedattn.cli.main import main

TINY = ["--worker", "tiny-random:2", "--worker", "tiny-random-wide", "--draft", "tiny-random-draft"]
EVAL = ["eval", "gsm8k", "--system", "specfed", *TINY, "--shots", "1", "--limit", "2", "--max-new-tokens", "6"]


def test_an_evaluation_records_specfed_runs_and_resumes_only_the_same_configuration(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*EVAL, "--top-k", "8", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["system"], summary["items"]) == ("specfed", 2)
    assert summary["setting"] == "gamma=4 top_k=8 redistribute"
    assert summary["bytes_per_query"] == summary["expected_bytes_per_query"]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    for record in records:
        report = record["report"]
        assert len(report["answer_token_ids"]) <= 6 and report["rounds"] >= 2
        sent = sum(party["bytes_sent"] for party in report["parties"])
        assert sent == report["expected_bytes"]["sent"] < report["baselines"]["full distributions"]
    assert main([*EVAL, "--top-k", "16", "--out", str(out)]) == 2
    assert "another configuration (differs in" in capsys.readouterr().err
    assert main(["compare", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| specfed | gamma=4 top_k=8 redistribute | tiny-random+tiny-random-wide | 2 |" in table


def test_one_worker_without_drafts_is_described_as_that_model_alone(tmp_path, capsys):
    out = tmp_path / "alone"
    words = ["eval", "gsm8k", "--system", "specfed", "--worker", "tiny-random", "--draft", "lookup", "--gamma", "0"]
    assert main([*words, "--shots", "1", "--limit", "1", "--max-new-tokens", "4", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["setting"] == "tiny-random alone" and summary["reference"] is True


def test_fedattn_options_are_refused_under_system_specfed(capsys):
    assert main([*EVAL, "--sync-every", "2", "--out", "x"]) == 2
    assert "--sync-every" in capsys.readouterr().err
