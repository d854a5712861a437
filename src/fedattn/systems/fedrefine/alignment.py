"""Which sharer block and which sharer token each receiver block and token fuses with.

Blocks are aligned last to last (the spec's formula): deep blocks of models of different depths
hold comparable abstractions, so the last receiver block takes the last sharer block, and early
receiver blocks of a deeper receiver share the sharer's first block.

Tokens: the receiver's prompt is the base and is never changed (with the gates closed the receiver
answers exactly as alone). When both models number text the same way (same tokenizer fingerprint)
the sharer reads the receiver's own ids and every one of the prompt's first N - 1 positions is
fused. Otherwise only the user message's tokens are fused: each receiver message token is decoded
to its text (tokens holding parts of one character: that character) and re-encoded by the sharer's
tokenizer, and of the sharer tokens that yields the one with the longest text is kept (the first of
equals; C2C's default rule), so the sharer reads one token per receiver token, after its own chat
template's opening. The scaffolding of the two templates differs in length and meaning; it is not
fused (the receiver keeps its own K/V there), which is what C2C's padding of template sections
amounts to for the receiver.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedattn.errors import FedAttnError
from fedattn.runtime.prompting import chat_template_parts, tokenizer_fingerprint


def layer_map(receiver_blocks: int, sharer_blocks: int) -> list[int]:
    """The sharer block each receiver block t fuses: clamp(t + L_S - T_R, 0, L_S - 1)."""
    if receiver_blocks < 1 or sharer_blocks < 1:
        raise ValueError("both models need at least one block")
    return [min(max(t + sharer_blocks - receiver_blocks, 0), sharer_blocks - 1) for t in range(receiver_blocks)]


def sent_blocks(receiver_blocks: int, sharer_blocks: int) -> list[int]:
    """The sharer blocks whose K/V a sharer sends (each once, ascending)."""
    return sorted(set(layer_map(receiver_blocks, sharer_blocks)))


@dataclass(frozen=True)
class ReceiverPrompt:
    """The receiver's prompt ids and where the user message lies in them, [message_start, message_stop)."""

    ids: list[int]
    message_start: int
    message_stop: int

    @property
    def fusable(self) -> int:
        """The prompt's first N - 1 positions are fused; the last runs through the receiver alone."""
        return len(self.ids) - 1


def receiver_prompt(tokenizer: PreTrainedTokenizerBase, message: str, raw: bool = False) -> ReceiverPrompt:
    """The message in the receiver's chat template (``raw``, or a model without one: the message
    alone, after the special tokens the tokenizer puts first, such as a BOS). Template text has
    its special tokens parsed; the message never."""
    if not message.strip():
        raise FedAttnError("the prompt is empty")
    opening, closing = _scaffolding(tokenizer, raw)
    start = _encode(tokenizer, opening, special=True)
    body = _encode(tokenizer, message, special=False)
    end = _encode(tokenizer, closing, special=True)
    if not body:
        raise FedAttnError("the prompt tokenizes to nothing")
    ids = start + body + end
    if len(ids) < 2:
        raise FedAttnError("the prompt needs at least two tokens (all but the last are fused)")
    return ReceiverPrompt(ids, len(start), len(start) + len(body))


def _scaffolding(tokenizer: PreTrainedTokenizerBase, raw: bool) -> tuple[str, str]:
    parts = None if raw else chat_template_parts(tokenizer)
    if parts is not None:
        return parts
    return _added_prefix(tokenizer), ""


def _added_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special tokens the tokenizer puts before any text (Gemma's BOS; nothing for Qwen): a
    model without a chat template still reads its text after them."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    marked = tokenizer("a", add_special_tokens=True).input_ids
    return tokenizer.decode(marked[: len(marked) - len(plain)]) if marked[-len(plain) :] == plain else ""


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=not special).input_ids


@dataclass(frozen=True)
class SharerRequest:
    """What the receiver asks a sharer to read: its ids directly (same tokenizer), or the text of
    each receiver message token (another tokenizer). ``positions`` are the receiver positions the
    sharer's K/V will fuse, one per token the sharer sends back, in order."""

    positions: list[int]
    ids: list[int] | None = None
    pieces: list[str] | None = None


def sharer_request(
    prompt: ReceiverPrompt, receiver_tokenizer: PreTrainedTokenizerBase, same_tokenizer: bool
) -> SharerRequest:
    if same_tokenizer:
        return SharerRequest(list(range(prompt.fusable)), ids=prompt.ids[: prompt.fusable])
    stop = min(prompt.message_stop, prompt.fusable)
    message = prompt.ids[prompt.message_start : stop]
    return SharerRequest(list(range(prompt.message_start, stop)), pieces=token_texts(receiver_tokenizer, message))


UTF8_LONGEST = 4  # bytes of the longest UTF-8 character: a run of partial tokens completes within as many tokens


def token_texts(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Each token's text. A token holding part of a character (one byte of a multi-byte UTF-8
    character, as byte-level and byte-fallback tokenizers split rare characters) decodes alone to
    U+FFFD, which is no part of the message; it and the tokens that complete the character all
    stand for the text they make together."""
    texts: list[str] = []
    run: list[int] = []
    for token in ids:
        run.append(token)
        text = tokenizer.decode(run)
        if text.endswith("\ufffd") and len(run) < UTF8_LONGEST:
            continue
        texts += [text] * len(run)
        run = []
    return texts + [tokenizer.decode(run)] * len(run)


def same_tokenizer(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase) -> bool:
    return tokenizer_fingerprint(first) == tokenizer_fingerprint(second)


@dataclass(frozen=True)
class SharerInput:
    """The ids a sharer runs, and which of its positions it sends back (one per fused receiver token)."""

    ids: list[int]
    sent: list[int]


def sharer_input(request: SharerRequest, tokenizer: PreTrainedTokenizerBase, raw: bool = False) -> SharerInput:
    """The sharer's own reading of a request: the receiver's ids as they are, or its template's
    opening followed by one token per receiver message token (longest-text rule)."""
    if request.ids is not None:
        return SharerInput(list(request.ids), list(range(len(request.ids))))
    opening, _ = _scaffolding(tokenizer, raw)
    start = _encode(tokenizer, opening, special=True)
    mapped = [pick_token(tokenizer, piece) for piece in request.pieces or []]
    return SharerInput(start + mapped, list(range(len(start), len(start) + len(mapped))))


def pick_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Of ``text``'s tokens in this tokenizer, the one whose text is longest (the first of equals)."""
    candidates = _encode(tokenizer, text, special=False)
    if not candidates:
        raise FedAttnError(f"the sharer's tokenizer encodes {text!r} to nothing")
    lengths = [len(tokenizer.decode([token])) for token in candidates]
    return candidates[lengths.index(max(lengths))]
