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

Generation without fusion (the receiver alone or after hints, the sharers' hints, the rephrasing)
runs the model as HF ships it (``runtime.incremental``), so any model, Gemma 3's sliding windows
included, can be a receiver alone or a hint writer; fusion runs the receiver through the runtime's
hook (``fedrefine.receiver.answer``). In this process a sharer's cache still crosses as the K/V
frames of the wire (``network.frames``, through ``--kv-codec``): the receiver fuses what the codec
gives back, so quality reflects the codec, and the bytes reported are those frames' lengths beside
the cost model's. What a sharer receives is counted as its request: the receiver's prompt ids (4
bytes each) with the same tokenizer, else each message token's text (UTF-8 with a 2-byte length),
and for a hint the UTF-8 text of the hint request; a hint costs its UTF-8 text. Hellos and frame
headers of the request are the networked runner's, not counted here.
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
from fedattn.network.frames import KVBlock, KVExpectation, decode_kv, encode_kv, kv_frame_size
from fedattn.network.kv_codec import KVCodec, get_codec
from fedattn.report.schema import PartyReport, RunReport
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import Decoding, StopRule, answer_text, stop_rule
from fedattn.runtime.incremental import IncrementalLM
from fedattn.runtime.models import LoadedModel, load_model
from fedattn.runtime.prompting import check_prompt_length
from fedattn.systems.fedrefine.alignment import (
    ReceiverPrompt,
    SharerRequest,
    receiver_prompt,
    same_tokenizer,
    sent_blocks,
    sharer_input,
    sharer_request,
)
from fedattn.systems.fedrefine.caches import CacheDims, SharerCache, cache_dims, read_sharer_cache
from fedattn.systems.fedrefine.defaults import default_projector_dir
from fedattn.systems.fedrefine.projector import WEIGHTS_FILE, ProjectorSet, load_projectors, read_info
from fedattn.systems.fedrefine.receiver import Contribution, answer

SYSTEM = "refine"
IN_PROCESS = "in-process"
CACHE, TEXT = "cache", "text"
EXCHANGES = (CACHE, TEXT)
DEFAULT_RECEIVER = "qwen2.5-coder-0.5b-instruct"
DEFAULT_KV_CODEC = "float32"  # lossless: the receiver fuses the sharer's cache as the sharer computed it
DEFAULT_HINT_TOKENS = 64  # C2C allowed 256
REPHRASE_TOKENS = 128  # the most tokens of the receiver's rephrasing
REPHRASE = (
    "Rephrase the following question in other words, keeping its meaning. "
    "Do not answer it; reply with the rephrased question only.\n\n{question}"
)
BACKGROUND = "Briefly describe the most useful background to solve the problem:\n\n{question}"  # C2C's default
ID_BYTES, PIECE_LENGTH_BYTES = 4, 2  # a request's receiver id, a request piece's length prefix
RECEIVER = "receiver"


@dataclass(frozen=True)
class SharerChoice:
    """A sharer model by name (or path), and the folder of its projectors for the receiver (None: the default)."""

    model: str
    projector: Path | None = None

    def word(self) -> str:
        return self.model if self.projector is None else f"{self.model}:{self.projector}"


@dataclass(frozen=True)
class RefineEvalConfig:
    receiver: str
    sharers: tuple[SharerChoice, ...] = ()
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

    def to_json(self) -> dict[str, Any]:
        return {
            "receiver": self.receiver,
            "sharers": [choice.word() for choice in self.sharers],
            "exchange": self.exchange,
            "hint_tokens": self.hint_tokens,
            "rephrase": self.rephrase,
            "kv_codec": self.kv_codec,
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass
class SharerModel:
    """A sharer of the run: its model, and for cache fusion the pair's projectors and what it sends."""

    name: str  # its party name: sharer1, sharer2, ... in fusion order
    loaded: LoadedModel
    stop: StopRule
    dims: CacheDims
    same_tokenizer: bool
    blocks: list[int]  # the sharer blocks whose K/V it sends
    projectors: ProjectorSet | None = None
    projector_dir: Path | None = None

    def projector_json(self) -> dict[str, str] | None:
        """The projector folder and its weights' sha256: a folder's results are of these weights."""
        if self.projector_dir is None:
            return None
        digest = hashlib.sha256((self.projector_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
        return {"dir": str(self.projector_dir), "weights_sha256": digest}


@dataclass
class RefineEvalSetup:
    config: RefineEvalConfig
    receiver: LoadedModel
    sharers: list[SharerModel]
    device: str
    dtype: str
    stop: StopRule = field(init=False)
    split: SplitModel | None = field(init=False)

    def __post_init__(self) -> None:
        self.stop = stop_rule(self.receiver.tokenizer, self.receiver.model)
        self.split = SplitModel(self.receiver.model) if self.config.fuses else None

    def model_json(self) -> dict[str, Any]:
        sharers = [{"name": sharer.loaded.name, "identity": sharer.loaded.identity} for sharer in self.sharers]
        return {"name": self.receiver.name, "identity": self.receiver.identity, "sharers": sharers}


def projector_dir(receiver: str, choice: SharerChoice) -> Path:
    """The sharer's own projector folder, else the committed one of the pair, else a one-line refusal."""
    if choice.projector is not None:
        return choice.projector
    found = default_projector_dir(receiver, choice.model)
    if found is None:
        raise FedAttnError(
            f"no projector for receiver {receiver} and sharer {choice.model}: give --sharer {choice.model}:DIR, "
            f"or train one with `fedattn refine train --receiver {receiver} --sharer {choice.model} --out DIR`"
        )
    return found


def checked_projectors(directory: Path, receiver: LoadedModel, sharer: LoadedModel) -> ProjectorSet:
    """The projectors in ``directory``, refused in one line unless trained for these two models and their caches."""
    info = read_info(directory)
    if (info.receiver, info.sharer) != (receiver.name, sharer.name):
        raise FedAttnError(
            f"the projector in {directory} is for receiver {info.receiver} and sharer {info.sharer}, "
            f"not receiver {receiver.name} and sharer {sharer.name}"
        )
    dims = info.dims
    stored = (
        (receiver, CacheDims(dims.receiver_blocks, dims.receiver_heads, dims.receiver_head_dim)),
        (sharer, CacheDims(dims.sharer_blocks, dims.sharer_heads, dims.sharer_head_dim)),
    )
    for loaded, expected in stored:
        actual = cache_dims(loaded.model)
        if expected != actual:
            raise FedAttnError(
                f"the projector in {directory} expects {loaded.name} with a cache of {_shape(expected)}; "
                f"the loaded model has {_shape(actual)}"
            )
    return load_projectors(directory)


def _shape(dims: CacheDims) -> str:
    return f"{dims.blocks} blocks of {dims.heads} KV heads x {dims.head_dim}"


def load_setup(config: RefineEvalConfig, device: str, dtype: str, progress: bool = True) -> RefineEvalSetup:
    """Every model loaded and, for fusion, each pair's projectors found and checked (folders
    that are missing or are not projectors are refused before any model loads)."""
    directories = [projector_dir(config.receiver, choice) for choice in config.sharers] if config.fuses else []
    for directory in directories:
        read_info(directory)
    torch_dtype = getattr(torch, dtype)
    receiver = load_model(config.receiver, device=device, dtype=torch_dtype, progress=progress)
    sharers = []
    for index, choice in enumerate(config.sharers):
        loaded = load_model(choice.model, device=device, dtype=torch_dtype, progress=progress)
        dims = cache_dims(loaded.model)
        sharer = SharerModel(
            name=f"sharer{index + 1}",
            loaded=loaded,
            stop=stop_rule(loaded.tokenizer, loaded.model),
            dims=dims,
            same_tokenizer=same_tokenizer(receiver.tokenizer, loaded.tokenizer),
            blocks=sent_blocks(cache_dims(receiver.model).blocks, dims.blocks),
        )
        if config.fuses:
            sharer.projector_dir = directories[index]
            sharer.projectors = checked_projectors(directories[index], receiver, loaded).to(device)
        sharers.append(sharer)
    return RefineEvalSetup(config, receiver, sharers, device, dtype)


# -- one item -------------------------------------------------------------------------------------


@dataclass
class SharerOutcome:
    """What one sharer did for one item: bytes each way (measured, and the cost model's), its time."""

    received: int
    sent: int
    expected_received: int
    expected_sent: int
    frames_sent: int
    seconds: float
    details: dict[str, Any]


def answer_item(setup: RefineEvalSetup, message: str, bare_question: str = "") -> RunReport:
    """The receiver's answer to one chat message (``bare_question``: the question alone, for hints)."""
    start = time.perf_counter()
    config, receiver = setup.config, setup.receiver
    timing: dict[str, float] = {}
    asked, topic, rewrite = message, bare_question or message, None
    if config.rephrase:
        asked, topic, rewrite = rephrased_message(setup, message, bare_question)
        timing["rephrase_s"] = time.perf_counter() - start
    if config.fuses:
        prompt = receiver_prompt(receiver.tokenizer, asked)
        outcomes, contributions = [], []
        for sharer in setup.sharers:
            outcome, contribution = shared_cache(setup, sharer, prompt)
            outcomes.append(outcome)
            contributions.append(contribution)
        fused = answer(setup.split, prompt, contributions, Decoding(), setup.stop, config.max_new_tokens)
        tokens, seconds, prompt_ids = fused.token_ids, fused.seconds, prompt.ids
    else:
        outcomes = [written_hint(setup, sharer, topic) for sharer in setup.sharers]
        hints = [outcome.details["hint"] for outcome in outcomes]
        prompt_ids = (
            hinted_prompt(receiver, asked, topic, hints) if hints else receiver_prompt(receiver.tokenizer, asked).ids
        )
        tokens, seconds = generate(receiver, prompt_ids, setup.stop, config.max_new_tokens)
    text = answer_text(setup.stop, receiver.tokenizer, tokens)
    timing |= {"sharer_s": sum(outcome.seconds for outcome in outcomes), "fuse_s": 0.0, **seconds}
    details = {"exchange": config.exchange if setup.sharers else None, "rephrasing": rewrite}
    return run_report(setup, outcomes, text, tokens, len(prompt_ids), timing, details, time.perf_counter() - start)


def rephrased_message(setup: RefineEvalSetup, message: str, bare_question: str) -> tuple[str, str, str]:
    """(the message, the question, the rewrite) after rephrasing: the question alone when the
    message holds it (the choices and answer format stay as they are, and a model asked to
    rephrase a prompt ending "The correct answer is" would answer it), else the whole message."""
    if bare_question and bare_question in message:
        rewrite = rephrased(setup, bare_question)
        return message.replace(bare_question, rewrite, 1), rewrite, rewrite
    rewrite = rephrased(setup, message)
    return rewrite, rewrite, rewrite


def rephrased(setup: RefineEvalSetup, message: str) -> str:
    """The receiver's own greedy rewrite of ``message`` (at most ``REPHRASE_TOKENS`` tokens)."""
    receiver = setup.receiver
    ids = receiver_prompt(receiver.tokenizer, REPHRASE.format(question=message)).ids
    tokens, _ = generate(receiver, ids, setup.stop, REPHRASE_TOKENS)
    text = answer_text(setup.stop, receiver.tokenizer, tokens)
    if not text.strip():
        raise FedAttnError("the receiver's rephrasing of the question is empty: evaluate without --rephrase")
    return text


def shared_cache(
    setup: RefineEvalSetup, sharer: SharerModel, prompt: ReceiverPrompt
) -> tuple[SharerOutcome, Contribution]:
    """One sharer's cache of the receiver's prompt, through the codec as K/V frames, ready to fuse."""
    start = time.perf_counter()
    request = sharer_request(prompt, setup.receiver.tokenizer, sharer.same_tokenizer)
    reading = sharer_input(request, sharer.loaded.tokenizer)
    cache = read_sharer_cache(sharer.loaded.model, reading, sharer.blocks)
    codec = get_codec(setup.config.kv_codec)
    frames = cache_frames(cache, request.positions[0], codec)
    received = through_codec(frames, sharer, request, codec, setup.device)
    seconds = time.perf_counter() - start
    expected = cache_bytes(codec, len(request.positions), sharer.dims, len(sharer.blocks))
    asked = request_bytes(request)
    outcome = SharerOutcome(
        received=asked,
        sent=sum(len(frame) for frame in frames),
        expected_received=asked,
        expected_sent=expected,
        frames_sent=len(frames),
        seconds=seconds,
        details={
            "tokens": len(request.positions),
            "blocks": len(sharer.blocks),
            "same_tokenizer": sharer.same_tokenizer,
        },
    )
    return outcome, Contribution(sharer.projectors, received, request.positions)


def cache_frames(cache: SharerCache, first: int, codec: KVCodec) -> list[bytes]:
    """Each sent block's K and V as one K/V frame (positions first.. implied: the whole request)."""
    positions = torch.arange(first, first + cache.tokens)
    return [
        encode_kv(KVBlock(block, positions, key, value), codec, whole_segment=True)
        for block, key, value in zip(cache.blocks, cache.keys, cache.values, strict=True)
    ]


def through_codec(
    frames: list[bytes], sharer: SharerModel, request: SharerRequest, codec: KVCodec, device: str
) -> SharerCache:
    """The cache as the receiver decodes and validates it from the frames (shapes, tokens, finite values)."""
    first, count = request.positions[0], len(request.positions)
    keys, values = [], []
    for block, frame in zip(sharer.blocks, frames, strict=True):
        expect = KVExpectation(
            sharer.name, block, sharer.dims.heads, sharer.dims.head_dim, count, (first, first + count), count
        )
        decoded = decode_kv(frame, expect, codec)
        keys.append(decoded.key.to(device))
        values.append(decoded.value.to(device))
    return SharerCache(list(sharer.blocks), keys, values)


def cache_bytes(codec: KVCodec, tokens: int, sharer: CacheDims, blocks: int) -> int:
    """The cost model of a sharer's cache: one K/V frame per sent block, each a header and
    2 x tokens x heads_S x d_S values in the codec (bytes per element for a float codec)."""
    return blocks * kv_frame_size(tokens, True, codec, sharer.heads, sharer.head_dim)


def request_bytes(request: SharerRequest) -> int:
    """What a sharer is asked to read: the receiver's ids, or each message token's text."""
    if request.ids is not None:
        return ID_BYTES * len(request.ids)
    return sum(PIECE_LENGTH_BYTES + len(piece.encode()) for piece in request.pieces or [])


def written_hint(setup: RefineEvalSetup, sharer: SharerModel, topic: str) -> SharerOutcome:
    """A sharer's greedy background for ``topic`` on C2C's prompt, at most ``hint_tokens`` tokens."""
    start = time.perf_counter()
    asked = BACKGROUND.format(question=topic)
    tokenizer = sharer.loaded.tokenizer
    tokens, _ = generate(sharer.loaded, receiver_prompt(tokenizer, asked).ids, sharer.stop, setup.config.hint_tokens)
    hint = answer_text(sharer.stop, tokenizer, tokens)
    size, sent = len(asked.encode()), len(hint.encode())
    return SharerOutcome(
        size, sent, size, sent, 1, time.perf_counter() - start, {"hint": hint, "hint_tokens": len(tokens)}
    )


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


def run_report(
    setup: RefineEvalSetup,
    outcomes: list[SharerOutcome],
    text: str,
    tokens: list[int],
    prompt_tokens: int,
    timing: dict[str, float],
    details: dict[str, Any],
    wall_s: float,
) -> RunReport:
    """One item as the one report: each sharer's party, then the receiver's (who answers)."""
    parties = []
    for rank, (sharer, outcome) in enumerate(zip(setup.sharers, outcomes, strict=True)):
        party = PartyReport(
            name=sharer.name,
            rank=rank,
            role="sharer",
            bytes_sent=outcome.sent,
            bytes_received=outcome.received,
            frames_sent=outcome.frames_sent,
            frames_received=1,
            expected_bytes_sent=outcome.expected_sent,
            expected_bytes_received=outcome.expected_received,
            timing={"sharer_s": outcome.seconds},
            details={"model": sharer.loaded.name, **outcome.details},
        )
        parties.append(party)
    parties.append(
        PartyReport(
            name=RECEIVER,
            rank=len(outcomes),
            role="receiver",
            bytes_sent=sum(outcome.received for outcome in outcomes),
            bytes_received=sum(outcome.sent for outcome in outcomes),
            frames_sent=len(outcomes),
            frames_received=sum(outcome.frames_sent for outcome in outcomes),
            expected_bytes_sent=sum(outcome.expected_received for outcome in outcomes),
            expected_bytes_received=sum(outcome.expected_sent for outcome in outcomes),
            timing={key: value for key, value in timing.items() if key != "sharer_s"},
            answer=text,
            answer_token_ids=list(tokens),
            details={"model": setup.receiver.name, "tokens": prompt_tokens},
        )
    )
    expected = {
        "sent": sum(party.expected_bytes_sent or 0 for party in parties),
        "received": sum(party.expected_bytes_received or 0 for party in parties),
    }
    return RunReport(
        system=SYSTEM,
        transport=IN_PROCESS,
        model=setup.model_json(),
        config=setup.config.to_json(),
        answer=text,
        answer_token_ids=list(tokens),
        parties=parties,
        expected_bytes=expected,
        timing={"wall_s": wall_s, **timing},
        details=details,
        setting=label(setup.config.to_json()),
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
