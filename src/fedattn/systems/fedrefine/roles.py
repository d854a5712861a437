"""FedRefine's two roles: a sharer (its model; it answers one request per query with its cache) and
the receiver (the question, its model, the projectors of each sharer it uses; it fuses and answers).

The receiver asks any subset of the sharers of a run, each for the model its projectors were
trained for (the hello names it: name and identity); a sharer running another model, or asked for
more tokens than it serves, refuses and says why. The receiver learns from the sharer's answer
whether their tokenizers agree, and then sends its prompt's ids (same tokenizer) or the text of each
message token (another; ``alignment``). Each sharer's cache arrives as one K/V frame per sent block
and is validated against the sharer model the hello named (its heads, head size and sent blocks,
the request's token count and positions, finite values) before anything is fused; anything else is
refused naming the sender. The receiver fuses the caches in the order its sharers are given.

In the private mode (``rephrase``) the receiver's own model first rewrites the question, and the
rewrite is all that is used: the receiver's prompt for fusion and every sharer's request are the
rephrasing, so the original never leaves the receiver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import KVCodec, codec_by_code, get_codec
from fedattn.network.transport import Transport
from fedattn.runtime.attention import native_attention
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import Decoding, StopRule, answer_text
from fedattn.runtime.models import LoadedModel, model_fingerprint
from fedattn.runtime.prompting import check_prompt_length, tokenizer_fingerprint
from fedattn.systems.fedrefine import frames
from fedattn.systems.fedrefine.alignment import (
    ReceiverPrompt,
    SharerRequest,
    receiver_prompt,
    sent_blocks,
    sharer_input,
    sharer_request,
)
from fedattn.systems.fedrefine.caches import CacheDims, SharerCache, cache_dims, read_sharer_cache
from fedattn.systems.fedrefine.config import REPHRASE_TOKENS, RefineConfig
from fedattn.systems.fedrefine.projector import ProjectorSet
from fedattn.systems.fedrefine.receiver import Contribution, Prefilled, ReceiverAnswer, answer, answer_over, prefill

REPHRASE = (  # asked only to keep the meaning, a 0.5B model answered a prompt ending "The correct answer is"
    "Rephrase the following question in other words, keeping its meaning. "
    "Do not answer it; reply with the rephrased question only.\n\n{question}"
)


def rephrase(split: SplitModel, tokenizer, stop: StopRule, question: str, raw: bool) -> str:
    """The receiver's own greedy rewrite of ``question`` (at most ``REPHRASE_TOKENS`` tokens)."""
    prompt = receiver_prompt(tokenizer, REPHRASE.format(question=question), raw)
    tokens = answer(split, prompt, [], Decoding(), stop, REPHRASE_TOKENS).token_ids
    text = answer_text(stop, tokenizer, tokens)
    if not text.strip():
        raise FedAttnError("the receiver's rephrasing of the question is empty: ask without --rephrase")
    return text


def wire_request(request: SharerRequest, raw: bool) -> frames.Request:
    """The alignment's request as it crosses: contiguous positions, so only the first is sent."""
    first = request.positions[0]
    if request.positions != list(range(first, first + len(request.positions))):
        raise ValueError("a request's positions must be contiguous")
    return frames.Request(first, raw, ids=request.ids, pieces=request.pieces)


class Sharer:
    """A sharer's part of one query: the receiver's hello, then its request, answered with the K/V
    of the sharer blocks the receiver maps, for the tokens it asked."""

    def __init__(self, rank: int, receiver: int, transport: Transport, loaded: LoadedModel, max_tokens: int) -> None:
        self.rank, self.receiver, self.transport, self.loaded = rank, receiver, transport, loaded
        self.model = loaded.model
        self.dims = cache_dims(loaded.model)
        self.max_tokens = min(max_tokens, int(loaded.model.config.max_position_embeddings))
        self.hello: frames.Hello | None = None
        self.request: frames.Request | None = None
        self.blocks: list[int] = []
        self.refused: str | None = None
        self.compute_s = 0.0
        self.done = False

    @property
    def name(self) -> str:
        return self.transport.name_of(self.rank)

    @property
    def codec(self) -> KVCodec:
        return codec_by_code(self.hello.codec)

    def answer_hello(self) -> None:
        receiver = self.transport.name_of(self.receiver)
        try:
            hello = frames.decode_hello(self.transport.recv(self.receiver, "its hello"), receiver)
            self._check(hello)
        except FedAttnError as refusal:
            self._refuse(str(refusal))
            return
        self.hello = hello
        self.blocks = sent_blocks(hello.receiver_blocks, self.dims.blocks)
        self.transport.send(frames.encode_answer(tokenizer_fingerprint(self.loaded.tokenizer), None), [self.receiver])

    def send_cache(self) -> None:
        """The request read, the model run over it, and the sent blocks' K/V back (a refusal instead
        when the request is bad or the model cannot read it)."""
        if self.done:
            return
        receiver = self.transport.name_of(self.receiver)
        frame = self.transport.recv(self.receiver, "its request")
        vocabulary = self.model.get_input_embeddings().num_embeddings
        start = time.perf_counter()
        try:
            request = frames.decode_request(frame, receiver, self.hello.tokens, vocabulary)
            reading = sharer_input(
                SharerRequest(request.positions, request.ids, request.pieces), self.loaded.tokenizer, request.raw
            )
            if len(reading.ids) > self.max_tokens:
                reads = len(reading.ids)
                raise FedAttnError(f"its request reads {reads} tokens here; this sharer serves {self.max_tokens}")
            with native_attention(self.model):  # a service's model may be a receiver in another thread
                cache = read_sharer_cache(self.model, reading, self.blocks)
            encoded = [  # a quantized codec refuses values beyond its float16 scales
                frames.encode_cache_block(block, key, value, request.first, self.codec)
                for block, key, value in zip(cache.blocks, cache.keys, cache.values, strict=True)
            ]
        except FedAttnError as refusal:
            self._refuse(str(refusal))
            return
        self.compute_s += time.perf_counter() - start
        self.request = request
        self.transport.note("cache")
        for frame in encoded:
            self.transport.send(frame, [self.receiver])
        self.done = True

    def _check(self, hello: frames.Hello) -> None:
        """Refuse a hello for another model or more tokens than this sharer serves."""
        if hello.model != model_fingerprint(self.loaded.identity):
            raise FedAttnError(
                f"the receiver asks for {hello.name} (identity {hello.model.hex()}); "
                f"this sharer runs {self.loaded.name} ({self.loaded.identity[:16]})"
            )
        if hello.tokens > self.max_tokens:
            raise FedAttnError(
                f"the receiver asks for up to {hello.tokens} tokens; this sharer serves {self.max_tokens}"
            )

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        self.transport.send(frames.encode_answer(None, reason), [self.receiver])
        self.done = True


@dataclass
class SharerPlan:
    """What the receiver knows of one sharer it asks: its rank, the model its projectors were
    trained for (name, identity), and those projectors (whose dims say the cache's shape)."""

    rank: int
    model: str
    identity: str
    projectors: ProjectorSet

    @property
    def dims(self) -> CacheDims:
        dims = self.projectors.info.dims
        return CacheDims(dims.sharer_blocks, dims.sharer_heads, dims.sharer_head_dim)


@dataclass
class SharerExchange:
    """The receiver's record of one sharer: its request, its cache, and how long it took."""

    plan: SharerPlan
    request: frames.Request | None = None
    cache: SharerCache | None = None
    same_tokenizer: bool | None = None
    cache_s: float = 0.0  # hello sent to its whole cache received, as the receiver waited for it
    asked_at: float = field(default_factory=time.perf_counter)


class Receiver:
    """The party with the question: it asks its sharers, fuses their caches and answers."""

    def __init__(
        self,
        rank: int,
        transport: Transport,
        loaded: LoadedModel,
        split: SplitModel,
        config: RefineConfig,
        question: str,
        raw: bool,
        plans: list[SharerPlan],
        stop: StopRule,
    ) -> None:
        self.rank, self.transport, self.loaded, self.split = rank, transport, loaded, split
        self.config, self.question, self.raw, self.stop = config, question, raw, stop
        self.codec = get_codec(config.kv_codec)
        self.exchanges = [SharerExchange(plan) for plan in plans]
        self.rephrasing: str | None = None
        self.prompt: ReceiverPrompt | None = None
        self.prefilled: Prefilled | None = None
        self.result: ReceiverAnswer | None = None
        self.rephrase_s = 0.0
        self.done = False

    @property
    def name(self) -> str:
        return self.transport.name_of(self.rank)

    @property
    def answer_ids(self) -> list[int]:
        return self.result.token_ids if self.result else []

    def rephrase(self) -> None:
        """In the private mode, the question rewritten by the receiver's own model: all that is used after."""
        if self.config.rephrase:
            start = time.perf_counter()
            self.rephrasing = rephrase(self.split, self.loaded.tokenizer, self.stop, self.question, self.raw)
            self.rephrase_s = time.perf_counter() - start

    def send_hellos(self) -> None:
        """The prompt (of the rephrasing, in the private mode), then a hello to every sharer asked."""
        message = self.question if self.rephrasing is None else self.rephrasing
        self.prompt = receiver_prompt(self.loaded.tokenizer, message, self.raw)
        check_prompt_length(len(self.prompt.ids), self.config.max_new_tokens, self.split.max_positions)
        for exchange in self.exchanges:
            plan = exchange.plan
            fingerprint, blocks = model_fingerprint(plan.identity), self.split.num_blocks
            hello = frames.Hello(fingerprint, plan.model, self.codec.code, blocks, self.prompt.fusable)
            exchange.asked_at = time.perf_counter()
            self.transport.send(frames.encode_hello(hello), [plan.rank])

    def send_requests(self) -> None:
        """Each sharer's answer, then its request: ids when its tokenizer is the receiver's, else texts."""
        own = tokenizer_fingerprint(self.loaded.tokenizer)
        for exchange in self.exchanges:
            rank = exchange.plan.rank
            sharer = self.transport.name_of(rank)
            reply = frames.decode_answer(self.transport.recv(rank, "its answer to the hello"), sharer)
            if not reply.accepted:
                raise FedAttnError(f"{sharer} refused: {reply.reason}")
            exchange.same_tokenizer = reply.tokenizer == own
            request = sharer_request(self.prompt, self.loaded.tokenizer, exchange.same_tokenizer)
            if not request.positions:
                raise FedAttnError(f"the prompt leaves no message token to fuse with {sharer}'s cache")
            exchange.request = wire_request(request, self.raw)
            self.transport.send(frames.encode_request(exchange.request), [rank])

    def receive_caches(self) -> None:
        """Each sharer's cache, block by block, validated against the model its hello named."""
        for exchange in self.exchanges:
            exchange.cache = self._receive_cache(exchange)
            exchange.cache_s = time.perf_counter() - exchange.asked_at

    def _receive_cache(self, exchange: SharerExchange) -> SharerCache:
        rank, dims, request = exchange.plan.rank, exchange.plan.dims, exchange.request
        sharer = self.transport.name_of(rank)
        blocks = sent_blocks(self.split.num_blocks, dims.blocks)
        shape = frames.CacheShape(self.codec, dims.heads, dims.head_dim, blocks, request.count, request.first)
        keys, values = [], []
        for index, block in enumerate(blocks):
            frame = self.transport.recv(rank, f"its cache at block {block}")
            if frames.is_answer(frame):
                raise FedAttnError(f"{sharer} refused: {frames.decode_answer(frame, sender=sharer).reason}")
            key, value = frames.decode_cache_block(frame, shape, index, sharer)
            keys.append(key.to(self.split.device))
            values.append(value.to(self.split.device))
        return SharerCache(blocks, keys, values)

    def prefill(self) -> None:
        """The receiver's own cache of the prompt, made while the sharers compute theirs."""
        self.prefilled = prefill(self.split, self.prompt, self.config.max_new_tokens)

    def fuse_and_answer(self) -> None:
        contributions = [
            Contribution(exchange.plan.projectors, exchange.cache, exchange.request.positions)
            for exchange in self.exchanges
        ]
        config = self.config
        self.result = answer_over(
            self.split, self.prefilled, self.prompt, contributions, config.decoding, self.stop, config.max_new_tokens
        )
        self.done = True
