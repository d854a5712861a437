"""Turning the parties' texts into token segments whose concatenation is the centralized prompt.

With a chat model the template wraps the whole global prompt: its opening belongs to the first
party, its closing and the assistant-turn opening to the publisher. Template pieces are tokenized
with special tokens recognized; the parties' own text never is (a context cannot smuggle in
control tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .errors import FedAttnError

CONTEXT_SEPARATOR = "\n\n"
_SENTINEL = "\x00FEDATTN-USER-MESSAGE\x00"


@dataclass(frozen=True)
class Piece:
    text: str
    template: bool  # template text: special tokens are parsed


def party_pieces(
    contexts: list[str], question: str, publisher_context: str | None, chat_template: tuple[str, str] | None
) -> list[list[Piece]]:
    """Per party (collaborators in order, publisher last), its text pieces.

    ``chat_template`` is the (opening, closing) around the user message, or None for raw text.
    """
    if not question.strip():
        raise FedAttnError("the question is empty")
    for index, context in enumerate(contexts, start=1):
        if not context.strip():
            raise FedAttnError(f"context {index} is empty")
    if publisher_context is not None and not publisher_context.strip():
        raise FedAttnError("the publisher context is empty")
    if chat_template is None:
        parties = [[Piece(context, False)] for context in contexts]
        return parties + [[Piece((publisher_context or "") + question, False)]]
    opening, closing = chat_template
    parties = [[Piece(context + CONTEXT_SEPARATOR, False)] for context in contexts]
    publisher = [Piece(publisher_context + CONTEXT_SEPARATOR, False)] if publisher_context else []
    publisher += [Piece(question, False), Piece(closing, True)]
    parties.append(publisher)
    parties[0].insert(0, Piece(opening, True))
    return parties


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


def build_segments(
    tokenizer: PreTrainedTokenizerBase,
    contexts: list[str],
    question: str,
    publisher_context: str | None = None,
    raw: bool = False,
) -> list[list[int]]:
    """Token segments, one per party; each party's segment comes from its own text only."""
    template = None if raw else chat_template_parts(tokenizer)
    if not raw and template is None:
        raise FedAttnError("the model has no chat template; use --raw")
    segments = [tokenize_pieces(tokenizer, pieces) for pieces in party_pieces(contexts, question, publisher_context, template)]
    for index, segment in enumerate(segments):
        if not segment:
            raise FedAttnError(f"party {index + 1}'s text tokenizes to nothing")
    return segments


def check_context_window(segments: list[list[int]], max_new_tokens: int, max_positions: int) -> None:
    total = sum(len(segment) for segment in segments)
    if total + max_new_tokens > max_positions:
        raise FedAttnError(
            f"the prompt has {total} tokens; with {max_new_tokens} new tokens it exceeds the model's "
            f"context of {max_positions} positions"
        )
