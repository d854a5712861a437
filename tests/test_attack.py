"""``fedattn attack`` and the K/V noise defense, on the tiny random model (seconds in all)."""

from __future__ import annotations

import json

import pytest
import torch

from fedattn.cli.main import main
from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import get_codec
from fedattn.privacy import kv_attack as attack
from fedattn.privacy.noise import add_kv_noise


@pytest.fixture(scope="module")
def victims(tiny):
    """Two CrossFacts collaborator segments: the second starts at a non-zero global position."""
    return attack.crossfacts_victims(tiny[1], 2, data_seed=0)


def block_setup(tiny, victims, codec: str, blocks: set[int], probes=None) -> attack.AttackSetup:
    model, tokenizer = tiny
    captured = [attack.capture_kv(model, victim, blocks) for victim in victims]
    table = attack.vocabulary_table(model)
    return attack.AttackSetup(model, tokenizer, get_codec(codec), victims, captured, True, 0, table, probes or {})


def rate(setup: attack.AttackSetup, block: int, sigma: float) -> float:
    guessed, truth = attack.attack_block(setup, block, sigma)
    return float((guessed == truth).float().mean())


def test_victims_mark_template_tokens_public_and_carry_global_positions(tiny, victims):
    first, second = victims
    assert first.first_position == 0 and second.first_position == len(first.token_ids)
    assert not all(first.private) and any(first.private)  # the chat opening is public
    assert all(second.private)


def test_block0_attack_without_defense_is_exact(tiny, victims, one_torch_thread):
    setup = block_setup(tiny, victims, "float32", {0})
    assert rate(setup, 0, 0.0) == 1.0


def test_block0_attack_survives_bfloat16_codec(tiny, victims, one_torch_thread):
    setup = block_setup(tiny, victims, "bfloat16", {0})
    assert rate(setup, 0, 0.0) >= 0.95


def test_block0_recovery_falls_as_noise_rises(tiny, victims, one_torch_thread):
    setup = block_setup(tiny, victims, "float32", {0})
    rates = [rate(setup, 0, sigma) for sigma in (0.0, 1.0, 3.0, 10.0)]
    assert all(later <= earlier + 0.02 for earlier, later in zip(rates, rates[1:])), rates
    assert rates[-1] < 0.2 * rates[0], rates


def test_probe_beats_chance_at_a_deeper_block(tiny, victims, one_torch_thread):
    model, tokenizer = tiny
    probes = attack.train_probes(model, tokenizer, {1}, 2000, seed=0, unrotated_keys=True, advance=lambda count: None)
    setup = block_setup(tiny, victims, "float32", {1}, probes)
    assert rate(setup, 1, 0.0) > 0.3  # chance is 1/259


def test_verification_lifts_a_shallow_block(tiny, victims, one_torch_thread):
    model, tokenizer = tiny
    probes = attack.train_probes(model, tokenizer, {1}, 2000, seed=0, unrotated_keys=True, advance=lambda count: None)
    probe_only = block_setup(tiny, victims, "bfloat16", {1}, probes)
    verified = attack.AttackSetup(**{**probe_only.__dict__, "verify": 16})
    assert rate(verified, 1, 0.0) > rate(probe_only, 1, 0.0) + 0.05


def test_unrotate_inverts_rope(tiny, victims, one_torch_thread):
    model, _ = tiny
    victim = victims[1]
    key, _ = attack.capture_kv(model, victim, {0})[0]
    table = attack.vocabulary_table(model)
    pre_rope = table[torch.tensor(victim.token_ids), : key.shape[0] * key.shape[2]]
    unrotated = attack.unrotate(model, key.float(), victim.positions).transpose(0, 1).reshape(len(victim.token_ids), -1)
    torch.testing.assert_close(unrotated, pre_rope, atol=1e-5, rtol=1e-5)


def test_noise_is_scaled_per_channel_and_reproducible():
    generator = torch.Generator().manual_seed(0)
    key = torch.randn(2, 4000, 8) * torch.arange(1, 9)  # channel c has spread c + 1
    value = torch.randn(2, 4000, 8).to(torch.bfloat16)
    noisy_key, noisy_value = add_kv_noise(key, value, 0.5, generator)
    ratio = (noisy_key - key).std(dim=1) / key.std(dim=1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.5), atol=0.03, rtol=0)
    assert noisy_value.dtype == torch.bfloat16
    again, _ = add_kv_noise(key, value, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again, noisy_key)


def test_zero_noise_returns_the_inputs_and_negative_is_refused():
    key, value = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    same_key, same_value = add_kv_noise(key, value, 0.0, None)
    assert same_key is key and same_value is value
    with pytest.raises(FedAttnError, match="sigma"):
        add_kv_noise(key, value, -0.1, None)


def test_default_blocks():
    assert attack.default_blocks(24) == (0, 1, 2, 4, 8, 12, 16, 23)
    assert attack.default_blocks(8) == (0, 1, 2, 4, 5, 7)


def test_cli_writes_records_summary_and_plot(tmp_path, capsys, one_torch_thread):
    out = tmp_path / "attack"
    argv = [
        "attack",
        "--model",
        "tiny-random",
        "--dtype",
        "float32",
        "--blocks",
        "0,1",
        "--noise",
        "0,3",
        "--count",
        "2",
        "--train-tokens",
        "600",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted((record["block"], record["noise"]) for record in records) == [(0, 0.0), (0, 3.0), (1, 0.0), (1, 3.0)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rate"]["0"]["0"] == 1.0
    assert set(summary["cost"]) >= {"attack_s", "peak_rss_mb", "probe_fit_s", "vocabulary_table_s"}
    assert (out / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "block" in capsys.readouterr().out


def test_cli_resumes_only_the_points_not_yet_attacked(tmp_path, capsys, monkeypatch, one_torch_thread):
    out = tmp_path / "attack"
    argv = ["attack", "--model", "tiny-random", "--dtype", "float32", "--blocks", "0", "--noise", "0,1,3"]
    argv += ["--count", "1", "--out", str(out)]
    assert main(argv) == 0
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # interrupted in the third
    attacked = []
    real = attack.attack_block
    monkeypatch.setattr(attack, "attack_block", lambda setup, *point: attacked.append(point) or real(setup, *point))
    assert main(argv) == 0
    assert attacked == [(0, 3.0)]
    assert "records.jsonl:3: dropped a half-written record" in capsys.readouterr().err
    monkeypatch.setattr(attack, "_setup", lambda *args: pytest.fail("nothing left to attack: no setup"))
    assert main(argv) == 0  # a rerun resumes: nothing new
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [record["key"] for record in records] == ["block=0 noise=0", "block=0 noise=1", "block=0 noise=3"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rate"]["0"] == {f"{record['noise']:g}": record["rate"] for record in records}


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--noise", "-1"], ">= 0"),
        (["--noise", "abc"], "not a number"),
        (["--blocks", "9"], "out of range"),
        (["--kv-codec", "int3"], "unknown KV codec"),
        (["--count", "0"], ">= 1"),
        (["--verify", "17"], "0..16"),
        (["--source", "nope"], "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, fragment):
    code = main(["attack", "--model", "tiny-random", "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
