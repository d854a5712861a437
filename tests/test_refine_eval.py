"""FedRefine through the shared harness (``fedattn eval mc --system refine``): the multiple-choice task
end to end and resumable; the receiver alone as HF generates; closed gates as the receiver alone and
open gates as the core computes them; text-to-text hints as the sharer's own greedy generation;
the rephrasing as all a sharer reads; bytes against the cost model by hand; the comparison's rows."""

import json
from pathlib import Path

import pytest
import torch

from fedattn.cli.main import main
from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks import multiple_choice
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import Decoding, stop_rule
from fedattn.runtime.models import load_model
from fedattn.systems.fedrefine import harness_query as query
from fedattn.systems.fedrefine import roles
from fedattn.systems.fedrefine.alignment import receiver_prompt, sent_blocks, sharer_input, sharer_request
from fedattn.systems.fedrefine.caches import cache_dims, pair_dims, read_sharer_cache
from fedattn.systems.fedrefine.config import SharerSpec
from fedattn.systems.fedrefine.projector import PairDims, ProjectorInfo, ProjectorSet
from fedattn.systems.fedrefine.receiver import Contribution, answer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = [
    {"question": "Red planet?", "options": "A. Venus\nB. Mars\nC. Earth\nD. Moon", "answer": "B. Mars"},
    {"question": "Plants eat?", "options": "A. light\nB. sand\nC. salt\nD. rock", "answer": "A. light"},
    {"question": "Ice at?", "options": "A. 100\nB. 50\nC. 0\nD. 9", "answer": "C. 0"},
]
# frame sizes by hand: magic 4 bytes, version and kind 1 each, then
KV_HEADER = 22  # codec, flags 1 each, block, heads, head size 2 each, tokens, first position 4 each
HELLO = 22  # model fingerprint 8, codec 1, receiver blocks 2, tokens 4, name length 1 (then the name)
ANSWER = 17  # accepted 1, tokenizer fingerprint 8, reason length 2
REQUEST = 16  # raw and mode (ids or texts) 1 each, first position and count 4 each


@pytest.fixture
def openbookqa(tmp_path, monkeypatch) -> list[multiple_choice.Question]:
    path = tmp_path / "openbookqa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in QUESTIONS))
    monkeypatch.setenv("FEDATTN_OPENBOOKQA", str(path))
    return list(multiple_choice.evaluation_set("openbookqa"))


def projector_folder(folder: Path, receiver: str, sharer: str, open_gates: bool) -> Path:
    """An untrained projector set of the pair (every gate closed), or the same weights with the gates opened."""
    first, second = load_model(receiver, progress=False), load_model(sharer, progress=False)
    torch.manual_seed(0)
    projectors = ProjectorSet(
        ProjectorInfo(receiver, sharer, pair_dims(cache_dims(first.model), cache_dims(second.model)))
    )
    with torch.no_grad():
        for block in projectors.blocks:
            for path in (block.key, block.value):
                path.gate_logit.fill_(1.0 if open_gates else 0.0)
    projectors.eval().save(folder)
    return folder


def setup_of(*sharers: tuple[str, Path | None], **settings) -> query.RefineEvalSetup:
    choices = tuple(SharerSpec(model, folder) for model, folder in sharers)
    config = query.RefineEvalConfig("tiny-random", choices, **{"max_new_tokens": 6, **settings})
    return query.load_setup(config, "cpu", "float32", progress=False)


def hf_greedy(model_name: str, ids: list[int], max_new_tokens: int) -> list[int]:
    """HF's own greedy generation after ``ids`` (the reference)."""
    loaded = load_model(model_name, progress=False)
    output = loaded.model.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones(1, len(ids))
    )
    return output[0, len(ids) :].tolist()


def chat_ids(model_name: str, messages: list[dict]) -> list[int]:
    tokenizer = load_model(model_name, progress=False).tokenizer
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def records_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


EVAL = ["eval", "mc", "--task", "openbookqa", "--system", "refine", "--receiver", "tiny-random", "--device", "cpu"]


def test_eval_mc_answers_scores_and_resumes_only_the_same_configuration(tmp_path, capsys, openbookqa):
    out = tmp_path / "alone"
    assert main([*EVAL, "--max-new-tokens", "4", "--limit", "2", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["task"], summary["system"], summary["items"], summary["setting"]) == (
        "openbookqa",
        "refine",
        2,
        "tiny-random alone",
    )
    assert summary["reference"] is True and summary["exposure"] is None and summary["bytes_per_query"] == 0
    records = records_of(out)
    for index, record in enumerate(records):
        question = openbookqa[index]
        named = multiple_choice.parse_answer(record["answer"], question.labels)
        assert record["gold"] == question.gold and record["scores"]["answer"] == named
        assert record["scores"]["accuracy"] == float(named == question.gold)
        ids = chat_ids("tiny-random", [{"role": "user", "content": multiple_choice.prompt(question)}])
        assert record["report"]["answer_token_ids"] == hf_greedy("tiny-random", ids, 4)
    assert summary["metrics"]["accuracy"] == sum(r["scores"]["accuracy"] for r in records) / 2

    assert main([*EVAL, "--max-new-tokens", "4", "--limit", "3", "--out", str(out)]) == 0  # resumed: item 2 only
    resumed = records_of(out)
    assert resumed[:2] == records and [r["index"] for r in resumed] == [0, 1, 2]
    assert "over 3 questions" in capsys.readouterr().out
    assert main([*EVAL, "--max-new-tokens", "5", "--limit", "3", "--out", str(out)]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_closed_gates_answer_as_the_receiver_alone_and_open_gates_as_the_core_fuses(tmp_path):
    message = multiple_choice.prompt(
        multiple_choice.Question("q", "Red planet?", ("A", "B"), ("Mars", "Venus"), "A", "t")
    )
    alone = query.answer_item(setup_of(), message)
    closed = setup_of(
        ("tiny-random-wide", projector_folder(tmp_path / "closed", "tiny-random", "tiny-random-wide", False))
    )
    assert query.answer_item(closed, message).answer_token_ids == alone.answer_token_ids

    opened = setup_of(
        ("tiny-random-wide", projector_folder(tmp_path / "open", "tiny-random", "tiny-random-wide", True))
    )
    fused = query.answer_item(opened, message)
    receiver, sharer = load_model("tiny-random", progress=False), load_model("tiny-random-wide", progress=False)
    prompt = receiver_prompt(receiver.tokenizer, message)
    request = sharer_request(prompt, receiver.tokenizer, True)
    cache = read_sharer_cache(sharer.model, sharer_input(request, sharer.tokenizer), sent_blocks(8, 4))
    direct = answer(
        SplitModel(receiver.model),
        prompt,
        [Contribution(opened.fusion.projectors[0], cache, request.positions)],
        Decoding(),
        stop_rule(receiver.tokenizer, receiver.model),
        6,
    )
    assert fused.answer_token_ids == direct.token_ids  # float32 frames are lossless
    assert fused.answer_token_ids != alone.answer_token_ids  # the open gates change the answer


def test_a_gemma_sharer_fuses_across_tokenizers_and_bytes_are_the_cost_model_by_hand(tmp_path):
    """Two sharers fused in order, one of another tokenizer (tiny Gemma: its sliding window of 4
    takes a two-token message); int8 frames; every count by hand."""
    wide = projector_folder(tmp_path / "wide", "tiny-random", "tiny-random-wide", True)
    gemma = projector_folder(tmp_path / "gemma", "tiny-random", "tiny-random-gemma", False)
    setup = setup_of(("tiny-random-wide", wide), ("tiny-random-gemma", gemma), kv_codec="int8")
    closed = setup_of(("tiny-random-gemma", gemma))
    report = query.answer_item(setup, "Hi")
    assert query.answer_item(closed, "Hi").answer_token_ids == query.answer_item(setup_of(), "Hi").answer_token_ids

    n = len(receiver_prompt(setup.receiver.tokenizer, "Hi").ids) - 1  # same tokenizer: every fused position
    first, second, receiver = report.parties
    assert (first.details["model"], second.details["model"], receiver.role) == (
        "tiny-random-wide",
        "tiny-random-gemma",
        "receiver",
    )
    # the sharer's answer to the hello (17 bytes), then one K/V frame per sent block; int8 per token:
    # K and V each 2 heads x n tokens x (4 bytes of scale and minimum + 24 one-byte codes)
    assert first.bytes_sent == first.expected_bytes_sent == ANSWER + 4 * (KV_HEADER + 2 * 2 * n * (4 + 24))
    # the hello naming the model, then the request: the receiver's ids, 4 bytes each
    assert first.bytes_received == first.expected_bytes_received == HELLO + len("tiny-random-wide") + REQUEST + 4 * n
    assert second.details["tokens"] == 2 and report.details["sharers"][1]["same_tokenizer"] is False  # "H", "i"
    assert second.bytes_sent == ANSWER + 3 * (KV_HEADER + 2 * 1 * 2 * (4 + 24))  # 3 blocks, 1 KV head of 24
    assert second.bytes_received == HELLO + len("tiny-random-gemma") + REQUEST + 2 * (2 + 1)  # texts, 2-byte lengths
    assert receiver.bytes_received == first.bytes_sent + second.bytes_sent
    assert report.expected_bytes == {
        "sent": report.measured_bytes["sent"],
        "received": report.measured_bytes["received"],
    }
    compute = first.timing["sharer_compute_s"] + second.timing["sharer_compute_s"]
    assert report.timing["sharer_s"] == pytest.approx(compute)
    assert set(report.timing) >= {"wall_s", "sharer_s", "prefill_s", "fuse_s", "decode_s"}


def test_text_to_text_reads_the_sharers_own_greedy_hint_before_the_question(tmp_path):
    message, bare = "Which planet is red?\nA. Mars\nB. Venus", "Which planet is red?"
    setup = setup_of(("tiny-random-wide", None), exchange="text", hint_tokens=5)
    report = query.answer_item(setup, message, bare)
    hint_request = query.BACKGROUND.format(question=bare)
    sharer = load_model("tiny-random-wide", progress=False)
    hint_tokens = hf_greedy(
        "tiny-random-wide", chat_ids("tiny-random-wide", [{"role": "user", "content": hint_request}]), 5
    )
    hint = sharer.tokenizer.decode(hint_tokens, skip_special_tokens=True).strip()
    party = report.parties[0]
    assert party.details["hint"] == hint and party.bytes_received == len(hint_request.encode())
    assert party.bytes_sent == len(hint.encode())
    expected = chat_ids(
        "tiny-random",
        [
            {"role": "user", "content": hint_request},
            {"role": "assistant", "content": hint},
            {"role": "user", "content": message},
        ],
    )
    assert report.parties[-1].details["tokens"] == len(expected)
    assert report.answer_token_ids == hf_greedy("tiny-random", expected, 6)


def test_with_rephrasing_a_sharer_reads_the_rephrasing_only(tmp_path, monkeypatch):
    """The question alone is rewritten where the message holds it (choices kept), else the whole message."""
    monkeypatch.setattr(roles, "REPHRASE_TOKENS", 8)
    read = []
    monkeypatch.setattr(
        roles,
        "read_sharer_cache",
        lambda model, reading, blocks: read.append(reading.ids) or read_sharer_cache(model, reading, blocks),
    )
    folder = projector_folder(tmp_path / "closed", "tiny-random", "tiny-random-wide", False)
    tokenizer = load_model("tiny-random", progress=False).tokenizer
    for message, bare in (("Which planet is red?\nA. Mars\nB. Venus", "Which planet is red?"), ("Red planet?", "")):
        request = roles.REPHRASE.format(question=bare or message)
        reference = hf_greedy("tiny-random", chat_ids("tiny-random", [{"role": "user", "content": request}]), 8)
        rephrasing = tokenizer.decode(reference, skip_special_tokens=True).strip()
        assert rephrasing and (bare or message) not in rephrasing
        asked = message.replace(bare, rephrasing) if bare else rephrasing
        read.clear()
        report = query.answer_item(setup_of(("tiny-random-wide", folder), rephrase=True), message, bare)
        assert report.details["rephrasing"] == rephrasing
        assert read == [chat_ids("tiny-random", [{"role": "user", "content": asked}])[:-1]]
        hinted = setup_of(("tiny-random-wide", None), rephrase=True, exchange="text", hint_tokens=2)
        texts = query.answer_item(hinted, message, bare)
        assert texts.parties[0].bytes_received == len(query.BACKGROUND.format(question=rephrasing).encode())


def test_projector_folders_are_checked_against_the_models_in_one_line(tmp_path, capsys, openbookqa):
    wrong = projector_folder(tmp_path / "wrong", "tiny-random", "tiny-random-gemma", False)
    with pytest.raises(FedAttnError, match="trained for receiver tiny-random and sharer tiny-random-gemma, not"):
        setup_of(("tiny-random-wide", wrong))
    misshapen = ProjectorSet(ProjectorInfo("tiny-random", "tiny-random-wide", PairDims(8, 2, 16, 4, 2, 32)))
    misshapen.save(tmp_path / "misshapen")
    with pytest.raises(FedAttnError, match="expects a sharer cache of 4 blocks of 2 KV heads x 32; the sharer tiny-ra"):
        setup_of(("tiny-random-wide", tmp_path / "misshapen"))
    assert main([*EVAL, "--sharer", "tiny-random-wide", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "no projector for receiver tiny-random and sharer tiny-random-wide" in error and "\n" not in error
    assert "fedattn refine train --receiver tiny-random --sharer tiny-random-wide" in error


def test_compare_has_a_row_per_configuration(tmp_path, capsys, openbookqa):
    closed = projector_folder(tmp_path / "closed", "tiny-random", "tiny-random-wide", False)
    runs = {
        "alone": [],
        "c2c": ["--sharer", f"tiny-random-wide:{closed}"],
        "t2t": ["--sharer", "tiny-random-wide", "--exchange", "text", "--hint-tokens", "2"],
        "private": ["--sharer", f"tiny-random-wide:{closed}", "--rephrase"],
    }
    for name, options in runs.items():
        assert (
            main([*EVAL, "--max-new-tokens", "2", "--limit", "1", *options, "--out", str(tmp_path / "runs" / name)])
            == 0
        )
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "runs")]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| refine")]
    assert sorted((row[1], row[2], row[3], row[7].rstrip(" |")) for row in rows) == [
        ("C2C tiny-random-wide", "tiny-random", "1", "the prompt in clear"),
        ("C2C tiny-random-wide rephrase", "tiny-random", "1", "the rephrased prompt in clear"),
        ("T2T tiny-random-wide hint_tokens=2", "tiny-random", "1", "the prompt in clear"),
        ("tiny-random alone", "tiny-random", "1", "nothing exposed"),
    ]
