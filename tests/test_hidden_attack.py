"""``fedattn attack-split``: what the hidden states a split client sends give away, on tiny-random."""

from __future__ import annotations

import json

import pytest
import torch

from fedattn.cli.main import main
from fedattn.errors import FedAttnError
from fedattn.evaluation.plots import read_attacks, worst_recovery
from fedattn.network.kv_codec import get_codec
from fedattn.privacy import hidden_attack as attack
from fedattn.privacy.kv_attack import Victim, public_sequences
from fedattn.runtime.blocks import SplitModel
from fedattn.systems.base import Exposure

TEXT = "Marta's PIN is 4417; she banks at Northwind."


@pytest.fixture(scope="module")
def split(tiny) -> SplitModel:
    return SplitModel(tiny[0])


@pytest.fixture(scope="module")
def victim(tiny) -> Victim:
    ids = tiny[1](TEXT, add_special_tokens=False).input_ids
    return Victim(ids, 0, [True] * len(ids))


def reference_hidden(tiny, ids: list[int], depth: int) -> torch.Tensor:
    """h_A by HF's own forward (hidden_states[A] is the output of block A - 1): independent of SplitModel."""
    with torch.inference_mode():
        output = tiny[0](torch.tensor([ids]), output_hidden_states=True)
    return output.hidden_states[depth][0].float()


def search_rate(tiny, split, victim, depth: int, noise: attack.HiddenNoise) -> float:
    """The exhaustive search on what the client sends (HF's h_A through noise and a float32 frame)."""
    clean = reference_hidden(tiny, victim.token_ids, depth)
    sent = attack.received(clean, noise, get_codec("float32"), torch.Generator().manual_seed(0))
    guessed = attack.search_segment(split, depth, victim, sent, None, 259)
    return float((guessed == torch.tensor(victim.token_ids)).float().mean())


@pytest.mark.parametrize("depth", [1, 2])
def test_exhaustive_search_recovers_every_token_without_noise(tiny, split, victim, depth, one_torch_thread):
    assert search_rate(tiny, split, victim, depth, attack.HiddenNoise(0.0, False)) == 1.0


def test_search_recovery_falls_under_large_noise(tiny, split, victim, one_torch_thread):
    rates = [search_rate(tiny, split, victim, 1, attack.HiddenNoise(level, True)) for level in (0.0, 0.3, 5.0)]
    assert rates[0] == 1.0 and rates[-1] < 0.3, rates
    assert rates[2] <= rates[1], rates


def test_split_model_hidden_states_match_hf(tiny, split, victim):
    states = attack.hidden_states(split, victim.token_ids, [1, 3])
    for depth in (1, 3):
        torch.testing.assert_close(states[depth].float(), reference_hidden(tiny, victim.token_ids, depth))


def test_shortlist_bounds_the_search(tiny, split, victim, one_torch_thread):
    """With a shortlist that leaves out the true token at one position, that position is lost
    (the search picks only among the shortlist); with the true token listed, it is found."""
    clean = reference_hidden(tiny, victim.token_ids, 1)
    truth = torch.tensor(victim.token_ids)
    others = (truth.unsqueeze(1) + torch.arange(1, 4)) % 256  # three wrong tokens per position
    with_truth = torch.cat([others, truth.unsqueeze(1)], dim=1)
    assert torch.equal(attack.search_segment(split, 1, victim, clean, with_truth, 259), truth)
    without = with_truth.clone()
    without[0, 3] = (truth[0] + 4) % 256
    guessed = attack.search_segment(split, 1, victim, clean, without, 259)
    assert guessed[0] != truth[0]


@pytest.fixture(scope="module")
def public_pairs(tiny, split):
    sequences = public_sequences(tiny[1], 6 * 256, 0)
    return [
        (attack.hidden_states(split, sequence.token_ids, [2])[2], torch.tensor(sequence.token_ids))
        for sequence in sequences
    ]


def plan(steps: int, noise=attack.HiddenNoise(0.1, True)) -> attack.TrainingPlan:
    return attack.TrainingPlan(2, noise, 1, steps, 0, "float32", 6 * 256)


def test_decoder_gradients_reach_every_decoder_weight_and_not_the_head(split, public_pairs, one_torch_thread):
    decoder = attack.InversionDecoder(split, 1, seed=0)
    hidden, ids = public_pairs[0]
    decoder.loss(hidden, ids).backward()
    for name, parameter in decoder.named_parameters():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name
    assert split.model.lm_head.weight.grad is None
    assert not any("head" in name or "embed" in name for name in decoder.state_dict())


def test_decoder_training_lowers_held_out_loss(split, public_pairs, tmp_path, one_torch_thread):
    codec, noise = get_codec("float32"), attack.HiddenNoise(0.1, True)
    training, held_out = public_pairs[:5], public_pairs[5:]
    decoder = attack.InversionDecoder(split, 1, seed=0)
    before = attack.held_out_loss(decoder, held_out, noise, codec, 0)
    assert attack.train_decoder(decoder, plan(10), training, codec, tmp_path / "d.pt") == 10
    after = attack.held_out_loss(decoder, held_out, noise, codec, 0)
    assert after < before - 0.5, (before, after)


def test_decoder_checkpoint_resume_gives_the_same_state(split, public_pairs, tmp_path, one_torch_thread):
    codec = get_codec("float32")
    straight = attack.InversionDecoder(split, 1, seed=0)
    attack.train_decoder(straight, plan(4), public_pairs[:3], codec, tmp_path / "straight.pt")
    first = attack.InversionDecoder(split, 1, seed=0)
    attack.train_decoder(first, plan(2), public_pairs[:3], codec, tmp_path / "resumed.pt")
    resumed = attack.InversionDecoder(split, 1, seed=0)
    assert attack.train_decoder(resumed, plan(4), public_pairs[:3], codec, tmp_path / "resumed.pt") == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    other = attack.InversionDecoder(split, 1, seed=0)
    with pytest.raises(FedAttnError, match="another setting"):
        attack.train_decoder(
            other, plan(4, attack.HiddenNoise(0.5, True)), public_pairs[:3], codec, tmp_path / "resumed.pt"
        )


COMMON = [
    "attack-split", "--model", "tiny-random", "--source", "gsm8k", "--limit", "1", "--client-blocks", "1",
    "--train-tokens", "512",
]  # fmt: skip


def test_results_folder_resumes_only_what_is_missing(tmp_path, one_torch_thread, capsys):
    out = tmp_path / "split"
    words = [*COMMON, "--noise", "0,1", "--noise-relative", "--attack", "search", "--shortlist", "8", "--out", str(out)]
    assert main(words) == 0
    records = (out / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in records] == [
        "A=1 noise=0 relative attack=search",
        "A=1 noise=1 relative attack=search",
    ]
    first = json.loads(records[0])
    assert first["bytes_per_token"] == 64 * 4  # d = 64 float32 values
    assert 0.0 <= first["rate"] <= first["shortlist_hit_rate"] <= 1.0  # a guess is always a listed token
    assert first["probe_top1_rate"] <= first["shortlist_hit_rate"]
    (out / "records.jsonl").write_text(records[0] + "\n")
    assert main(words) == 0
    again = (out / "records.jsonl").read_text().splitlines()
    assert again[0] == records[0] and len(again) == 2
    assert json.loads(again[1])["key"] == "A=1 noise=1 relative attack=search"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rate"]["search A=1"]) == {"0", "1"}
    # plots and the comparison read the folder as hidden-state points covering a split run's exposure
    points = read_attacks([out])
    rates = {point.noise: point.rate for point in points}
    assert rates == {float(noise): rate for noise, rate in summary["rate"]["search A=1"].items()}
    run = Exposure("float32", (1,), 1.0, sent="hidden", relative=True)
    assert worst_recovery(points, run) == (rates[1.0], 1)
    assert worst_recovery(points, Exposure("float32", (2,), 1.0, sent="hidden", relative=True)) is None
    assert worst_recovery(points, Exposure("float32", (1,), 1.0, sent="hidden", relative=False)) is None


def test_decoder_point_records_its_losses_and_drops_its_checkpoint(tmp_path, one_torch_thread, capsys):
    out = tmp_path / "decoder"
    assert main([*COMMON, "--noise", "0.5", "--attack", "decoder", "--decoder-epochs", "1", "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert record["key"] == "A=1 noise=0.5 attack=decoder" and record["steps"] == 1  # 512 tokens: 1 trained, 1 held out
    assert record["held_out_loss_trained"] < record["held_out_loss_initial"]
    assert list((out / "decoders").iterdir()) == []


@pytest.mark.parametrize(
    "options, message",
    [
        (["--shortlist", "0"], "--shortlist"),
        (["--attack", "probe"], "--attack"),
        (["--noise", "-1"], "--noise"),
        (["--client-blocks", "8"], "--client-blocks 8"),
        (["--client-blocks", "0"], "--client-blocks"),
        (["--train-tokens", "100"], "--train-tokens"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, options, message, capsys):
    assert main([*COMMON, *options, "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fedattn: error:") and "\n" not in error and message in error, error
