"""FedRefine's evaluation configurations answered in one process: the receiver alone, C2C cache
fusion with any sharers, and text-to-text hints, each optionally on the receiver's own rephrasing.

One harness covers every baseline of the comparison: the receiver alone is a run without sharers,
a sharer alone is the sharer's model as the receiver without sharers, C2C fuses each sharer's
cache in the order given (``exchange`` "cache"), and text-to-text (``exchange`` "text") is C2C's
two-stage baseline (thu-nics/C2C ``rosetta/baseline/multi_stage.py``, ``TwoStageInference``): each
sharer first writes, greedily, background for the question alone (without its choices) on C2C's
prompt, and the receiver reads it as an earlier turn of the chat (asked for background, the
sharers' hints as the answer) before the item's prompt. With ``rephrase`` the receiver's own model
first rewrites the question (the question alone within the item's prompt when the item says what
it is, its choices and answer format kept; else the whole prompt), and everything after (the
sharers' reading, the receiver's answer) is on the rewritten prompt only.

Generation without fusion (the receiver alone or after hints, the sharers' hints) runs the model
as HF ships it (``runtime.incremental``), so any model, Gemma 3's sliding windows included, can be
a receiver alone or a hint writer. Fusion is FedRefine's own in-process run (``query.answer_chat``:
every hello, request and cache block crosses the in-process grid as a validated frame, through
``--kv-codec``), so its quality reflects the codec and its bytes are measured at the transport
beside the cost model's. A hint costs its UTF-8 text one way and the hint request's the other.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import get_codec
from fedattn.report.schema import PartyReport, RunReport
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import Decoding, StopRule, answer_text, stop_rule
from fedattn.runtime.incremental import IncrementalLM
from fedattn.runtime.models import LoadedModel, load_model
from fedattn.runtime.prompting import check_prompt_length
from fedattn.systems.fedrefine.alignment import receiver_prompt
from fedattn.systems.fedrefine.config import DEFAULT_KV_CODEC, RefineConfig, SharerSpec, projector_dir
from fedattn.systems.fedrefine.inprocess import sharer_name
from fedattn.systems.fedrefine.projector import WEIGHTS_FILE
from fedattn.systems.fedrefine.query import RefineSetup, answer_chat, model_json
from fedattn.systems.fedrefine.query import load_setup as load_fusion
from fedattn.systems.fedrefine.reporting import SYSTEM
from fedattn.systems.fedrefine.roles import rephrase

IN_PROCESS = "in-process"
CACHE, TEXT = "cache", "text"
EXCHANGES = (CACHE, TEXT)
DEFAULT_RECEIVER = "qwen2.5-coder-0.5b-instruct"
DEFAULT_HINT_TOKENS = 64  # C2C allowed 256
BACKGROUND = "Briefly describe the most useful background to solve the problem:\n\n{question}"  # C2C's default
RECEIVER = "receiver"


@dataclass(frozen=True)
class RefineEvalConfig:
    receiver: str
    sharers: tuple[SharerSpec, ...] = ()
    exchange: str = CACHE
    hint_tokens: int = DEFAULT_HINT_TOKENS
    rephrase: bool = False
    kv_codec: str = DEFAULT_KV_CODEC
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.exchange not in EXCHANGES:
            raise FedAttnError(f"unknown exchange {self.exchange!r}: choose {' or '.join(EXCHANGES)}")
        get_codec(self.kv_codec)

    @property
    def fuses(self) -> bool:
        return self.exchange == CACHE and bool(self.sharers)

    def wire_config(self) -> RefineConfig:
        """The fusion run's own configuration (the harness rephrases before it, so it does not)."""
        return RefineConfig(self.sharers, self.kv_codec, False, Decoding(), self.max_new_tokens)

    def to_json(self) -> dict[str, Any]:
        return {
            "receiver": self.receiver,
            "sharers": [spec.word() for spec in self.sharers],
            "exchange": self.exchange,
            "hint_tokens": self.hint_tokens,
            "rephrase": self.rephrase,
            "kv_codec": self.kv_codec,
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass
class RefineEvalSetup:
    """The receiver and the sharers loaded; for fusion, FedRefine's own setup with each pair's projectors."""

    config: RefineEvalConfig
    receiver: LoadedModel
    sharers: list[LoadedModel]
    device: str
    dtype: str
    fusion: RefineSetup | None = None
    projector_dirs: list[Path] = field(default_factory=list)
    stop: StopRule = field(init=False)
    split: SplitModel | None = field(init=False)  # the receiver's runner: fusion's, or the rephrasing's

    def __post_init__(self) -> None:
        self.stop = stop_rule(self.receiver.tokenizer, self.receiver.model)
        self.split = (
            self.fusion.split if self.fusion else SplitModel(self.receiver.model) if self.config.rephrase else None
        )

    def model_json(self) -> dict[str, Any]:
        return model_json(self.receiver, [(sharer.name, sharer.identity) for sharer in self.sharers])

    def projectors_json(self) -> list[dict[str, str]]:
        """Each projector folder and its weights' sha256: a results folder's answers are of these weights."""
        return [
            {
                "dir": str(directory),
                "weights_sha256": hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest(),
            }
            for directory in self.projector_dirs
        ]


def load_setup(config: RefineEvalConfig, device: str, dtype: str, progress: bool = True) -> RefineEvalSetup:
    """Every model loaded and, for fusion, each pair's projectors found and checked (a missing
    projector is refused before any model loads)."""
    if config.fuses:
        fusion = load_fusion(config.wire_config(), config.receiver, device, dtype, raw=False, progress=progress)
        directories = [projector_dir(config.receiver, spec) for spec in config.sharers]
        return RefineEvalSetup(config, fusion.receiver, fusion.sharers, device, dtype, fusion, directories)
    torch_dtype = getattr(torch, dtype)
    receiver = load_model(config.receiver, device=device, dtype=torch_dtype, progress=progress)
    sharers = [load_model(spec.model, device=device, dtype=torch_dtype, progress=progress) for spec in config.sharers]
    return RefineEvalSetup(config, receiver, sharers, device, dtype)


# -- one item -------------------------------------------------------------------------------------


@dataclass
class HintOutcome:
    """One sharer's hint for one item: the text, its tokens, bytes each way, and its time."""

    hint: str
    tokens: int
    received: int
    sent: int
    seconds: float


def answer_item(setup: RefineEvalSetup, message: str, bare_question: str = "") -> RunReport:
    """The receiver's answer to one chat message (``bare_question``: the question alone, for hints and rephrasing)."""
    start = time.perf_counter()
    config = setup.config
    asked, topic, rewrite = message, bare_question or message, None
    if config.rephrase:
        asked, topic, rewrite = rephrased_message(setup, message, bare_question)
    rephrase_s = time.perf_counter() - start
    report = fused_report(setup, asked) if config.fuses else hinted_report(setup, asked, topic)
    report.timing["wall_s"] = time.perf_counter() - start
    if config.rephrase:
        report.timing["rephrase_s"] = rephrase_s
    report.config = config.to_json()
    report.setting = label(report.config)
    report.details |= {"exchange": config.exchange if setup.sharers else None, "rephrasing": rewrite}
    return report


def rephrased_message(setup: RefineEvalSetup, message: str, bare_question: str) -> tuple[str, str, str]:
    """(the message, the question, the rewrite) after the receiver's own rephrasing
    (``roles.rephrase``): of the question alone when the message holds it (the choices and
    answer format stay as they are, and a small model asked to rephrase a prompt ending "The
    correct answer is" answers it instead), else of the whole message."""
    question = bare_question if bare_question and bare_question in message else message
    rewrite = rephrase(setup.split, setup.receiver.tokenizer, setup.stop, question, raw=False)
    return message.replace(question, rewrite, 1), rewrite, rewrite


def fused_report(setup: RefineEvalSetup, asked: str) -> RunReport:
    """C2C: FedRefine's own in-process run over ``asked``; ``sharer_s`` is the sharers' compute."""
    report = answer_chat(setup.fusion, asked)
    sharers = [party for party in report.parties if party.role == "sharer"]
    report.timing["sharer_s"] = sum(party.timing.get("sharer_compute_s", 0.0) for party in sharers)
    return report


def hinted_report(setup: RefineEvalSetup, asked: str, topic: str) -> RunReport:
    """The receiver alone, or after each sharer's hint (C2C's text-to-text)."""
    receiver = setup.receiver
    hints = [written_hint(setup, sharer, topic) for sharer in setup.sharers]
    if hints:
        prompt_ids = hinted_prompt(receiver, asked, topic, [hint.hint for hint in hints])
    else:
        prompt_ids = receiver_prompt(receiver.tokenizer, asked).ids
    tokens, seconds = generate(receiver, prompt_ids, setup.stop, setup.config.max_new_tokens)
    text = answer_text(setup.stop, receiver.tokenizer, tokens)
    timing = {"sharer_s": sum(hint.seconds for hint in hints), "fuse_s": 0.0, **seconds}
    return hint_report(setup, hints, text, tokens, len(prompt_ids), timing)


def written_hint(setup: RefineEvalSetup, sharer: LoadedModel, topic: str) -> HintOutcome:
    """A sharer's greedy background for ``topic`` on C2C's prompt, at most ``hint_tokens`` tokens."""
    start = time.perf_counter()
    asked = BACKGROUND.format(question=topic)
    stop = stop_rule(sharer.tokenizer, sharer.model)
    tokens, _ = generate(sharer, receiver_prompt(sharer.tokenizer, asked).ids, stop, setup.config.hint_tokens)
    hint = answer_text(stop, sharer.tokenizer, tokens)
    return HintOutcome(hint, len(tokens), len(asked.encode()), len(hint.encode()), time.perf_counter() - start)


def hinted_prompt(receiver: LoadedModel, asked: str, topic: str, hints: list[str]) -> list[int]:
    """The receiver's prompt after the hints, as C2C's two-stage answer: the background request,
    the hints as the assistant's reply, then the item's message (no chat template: C2C's fallback,
    the hints before the message)."""
    tokenizer = receiver.tokenizer
    background = "\n\n".join(hints)
    if not getattr(tokenizer, "chat_template", None):
        return receiver_prompt(tokenizer, f"Background context: {background}\n\n{asked}").ids
    messages = [
        {"role": "user", "content": BACKGROUND.format(question=topic)},
        {"role": "assistant", "content": background},
        {"role": "user", "content": asked},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.inference_mode()
def generate(loaded: LoadedModel, ids: list[int], stop: StopRule, max_new_tokens: int) -> tuple[list[int], dict]:
    """Greedy tokens after ``ids`` with the model as HF ships it, and its prefill and decoding seconds."""
    check_prompt_length(len(ids), max_new_tokens, int(loaded.model.config.max_position_embeddings))
    model = IncrementalLM(loaded.model)
    start = time.perf_counter()
    logits = model.next_token_logits(ids, 1)[-1]
    prefilled = time.perf_counter()
    decoding, sequence, tokens = Decoding(), list(ids), []
    while True:
        tokens.append(decoding.pick(logits, None))
        if stop(tokens) or len(tokens) >= max_new_tokens:
            break
        sequence.append(tokens[-1])
        logits = model.next_token_logits(sequence, 1)[-1]
    return tokens, {"prefill_s": prefilled - start, "decode_s": time.perf_counter() - prefilled}


# -- the report -----------------------------------------------------------------------------------


def hint_report(
    setup: RefineEvalSetup,
    hints: list[HintOutcome],
    text: str,
    tokens: list[int],
    prompt_tokens: int,
    timing: dict[str, float],
) -> RunReport:
    """One item without fusion as the one report: each sharer's party (its hint), then the receiver's."""
    parties = []
    for rank, (sharer, hint) in enumerate(zip(setup.sharers, hints, strict=True)):
        parties.append(
            PartyReport(
                name=sharer_name(rank),
                rank=rank,
                role="sharer",
                bytes_sent=hint.sent,
                bytes_received=hint.received,
                frames_sent=1,
                frames_received=1,
                expected_bytes_sent=hint.sent,
                expected_bytes_received=hint.received,
                timing={"sharer_s": hint.seconds},
                details={"model": sharer.name, "hint": hint.hint, "hint_tokens": hint.tokens},
            )
        )
    parties.append(
        PartyReport(
            name=RECEIVER,
            rank=len(hints),
            role="receiver",
            bytes_sent=sum(hint.received for hint in hints),
            bytes_received=sum(hint.sent for hint in hints),
            frames_sent=len(hints),
            frames_received=len(hints),
            expected_bytes_sent=sum(hint.received for hint in hints),
            expected_bytes_received=sum(hint.sent for hint in hints),
            timing={key: value for key, value in timing.items() if key != "sharer_s"},
            answer=text,
            answer_token_ids=list(tokens),
            details={"tokens": prompt_tokens},
        )
    )
    total = sum(hint.sent + hint.received for hint in hints)
    return RunReport(
        system=SYSTEM,
        transport=IN_PROCESS,
        model=setup.model_json(),
        config={},
        answer=text,
        answer_token_ids=list(tokens),
        parties=parties,
        expected_bytes={"sent": total, "received": total},
        timing=dict(timing),
    )


def short_name(model: str) -> str:
    """A model as a label names it: family and size ('qwen1.5b', 'gemma270m'), else its name."""
    name = Path(model).name.lower()
    family, size = re.match(r"[a-z]*", name).group(0), re.search(r"(?<![a-z])(\d+(?:\.\d+)?[bm])(?![a-z])", name)
    return f"{family}{size.group(1)}" if family and size else name


def label(config: dict[str, Any]) -> str:
    """'C2C qwen1.5b+gemma270m', 'T2T qwen1.5b', 'qwen0.5b alone' (the receiver alone, or a sharer's
    model alone as the receiver), and any setting away from its default."""
    sharers = [word.split(":", 1)[0] for word in config["sharers"]]
    if not sharers:
        parts = [f"{short_name(config['receiver'])} alone"]
    else:
        kind = "C2C" if config["exchange"] == CACHE else "T2T"
        parts = [f"{kind} {'+'.join(short_name(model) for model in sharers)}"]
        if config["exchange"] == CACHE and config["kv_codec"] != DEFAULT_KV_CODEC:
            parts.append(f"kv_codec={config['kv_codec']}")
        if config["exchange"] == TEXT and config["hint_tokens"] != DEFAULT_HINT_TOKENS:
            parts.append(f"hint_tokens={config['hint_tokens']}")
    if config["rephrase"]:
        parts.append("rephrase")
    return " ".join(parts)
