"""Turning the parties' texts into token segments whose concatenation is the centralized prompt.

With a chat model the template wraps the whole global prompt: its opening belongs to the first
party, its closing and the assistant-turn opening to the publisher. Template pieces are tokenized
with special tokens recognized; the parties' own text never is (a context cannot smuggle in
control tokens).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedattn.errors import FedAttnError

CONTEXT_SEPARATOR = "\n\n"
_SENTINEL = "\x00FEDATTN-USER-MESSAGE\x00"


@dataclass(frozen=True)
class Piece:
    text: str
    template: bool  # template text: special tokens are parsed


def collaborator_pieces(context: str, first: bool, chat_template: tuple[str, str] | None) -> list[Piece]:
    """A collaborator's pieces; the first party also owns the template's opening."""
    if not context.strip():
        raise FedAttnError("a context is empty")
    if chat_template is None:
        return [Piece(context, False)]
    opening = [Piece(chat_template[0], True)] if first else []
    return opening + [Piece(context + CONTEXT_SEPARATOR, False)]


def publisher_pieces(
    question: str, publisher_context: str | None, alone: bool, chat_template: tuple[str, str] | None
) -> list[Piece]:
    """The publisher's pieces: its own text, the question, and the template's closing.

    ``alone``: no collaborators, so the publisher also owns the opening.
    """
    if not question.strip():
        raise FedAttnError("the question is empty")
    if publisher_context is not None and not publisher_context.strip():
        raise FedAttnError("the publisher context is empty")
    if chat_template is None:
        return [Piece((publisher_context or "") + question, False)]
    opening, closing = chat_template
    pieces = [Piece(opening, True)] if alone else []
    if publisher_context:
        pieces.append(Piece(publisher_context + CONTEXT_SEPARATOR, False))
    return pieces + [Piece(question, False), Piece(closing, True)]


def party_pieces(
    contexts: list[str], question: str, publisher_context: str | None, chat_template: tuple[str, str] | None
) -> list[list[Piece]]:
    """Per party (collaborators in order, publisher last), its text pieces.

    ``chat_template`` is the (opening, closing) around the user message, or None for raw text.
    """
    for index, context in enumerate(contexts, start=1):
        if not context.strip():
            raise FedAttnError(f"context {index} is empty")
    parties = [collaborator_pieces(context, index == 0, chat_template) for index, context in enumerate(contexts)]
    return parties + [publisher_pieces(question, publisher_context, not contexts, chat_template)]


def chat_template_parts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str] | None:
    """The template text before and after a single user message, or None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    opening, found, closing = rendered.partition(_SENTINEL)
    if not found:
        raise FedAttnError("the model's chat template does not place the user message verbatim; use --raw")
    return opening, closing


def tokenize_pieces(tokenizer: PreTrainedTokenizerBase, pieces: list[Piece]) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        if piece.text:
            ids += tokenizer(piece.text, add_special_tokens=False, split_special_tokens=not piece.template).input_ids
    return ids


def template_for(tokenizer: PreTrainedTokenizerBase, raw: bool) -> tuple[str, str] | None:
    """The chat template's (opening, closing), or None with --raw; a model without one needs --raw."""
    if raw:
        return None
    template = chat_template_parts(tokenizer)
    if template is None:
        raise FedAttnError("the model has no chat template; use --raw")
    return template


def tokenize_party(tokenizer: PreTrainedTokenizerBase, pieces: list[Piece], label: str) -> list[int]:
    segment = tokenize_pieces(tokenizer, pieces)
    if not segment:
        raise FedAttnError(f"{label}'s text tokenizes to nothing")
    return segment


def build_segments(
    tokenizer: PreTrainedTokenizerBase,
    contexts: list[str],
    question: str,
    publisher_context: str | None = None,
    raw: bool = False,
) -> list[list[int]]:
    """Token segments, one per party; each party's segment comes from its own text only."""
    pieces = party_pieces(contexts, question, publisher_context, template_for(tokenizer, raw))
    return [tokenize_party(tokenizer, party, f"party {index + 1}") for index, party in enumerate(pieces)]


def check_context_window(segments: list[list[int]], max_new_tokens: int, max_positions: int) -> None:
    check_prompt_length(sum(len(segment) for segment in segments), max_new_tokens, max_positions)


def check_prompt_length(total: int, max_new_tokens: int, max_positions: int) -> None:
    """The whole prompt and its answer must fit the model's positions (a networked party learns
    the total only from the others' hellos, so it checks the lengths, not the segments)."""
    if total + max_new_tokens > max_positions:
        raise FedAttnError(
            f"the prompt has {total} tokens; with {max_new_tokens} new tokens it exceeds the model's "
            f"context of {max_positions} positions"
        )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> bytes:
    """8 bytes that differ between tokenizers that split or number text differently (vocabulary,
    merges, special tokens): parties that exchange token ids or distributions over them compare it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(described.encode()).digest()[:8]


_PADDING_TOKEN = re.compile(r"\[PAD\d+\]")


def real_vocabulary(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many ids stand for text: the tokenizer's, less the trailing '[PADn]' placeholders a GGUF
    tokenizer lists for the embedding's padding rows (Qwen2.5: 151,665 of 151,936)."""
    size = len(tokenizer)
    while size > 0 and _PADDING_TOKEN.fullmatch(tokenizer.convert_ids_to_tokens(size - 1) or ""):
        size -= 1
    return size
