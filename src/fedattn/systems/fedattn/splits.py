"""The paper's four ways of dealing a few-shot GSM8K prompt to N parties (the last is the publisher).

The prompt is ``"\\n".join(exemplars) + question`` (the question text starts with "\\nQuestion: "),
used raw, as with the paper's base models: no chat template, no special tokens.

- TokAg: the whole token sequence cut into N even ranges; the last range ends with the question.
- SemAg: whole exemplars dealt to the N parties in contiguous groups; the publisher's group is
  followed by the question.
- TokEx: the exemplars' tokens cut into N-1 even ranges for parties 1..N-1; the publisher holds
  only the question.
- SemEx: whole exemplars dealt in contiguous groups to parties 1..N-1; the publisher holds only
  the question.

Rounding: "even" sizes differ by at most one, the longer ones first (``T = 10, N = 4`` gives
3, 3, 2, 2); groups of exemplars likewise, the larger groups first, so the publisher (who also
holds the question) never carries the largest share. Token splits tokenize the whole text once,
so their concatenation is exactly the centralized sequence; semantic splits tokenize each unit
(an exemplar with its leading "\\n" separator, or the question) on its own, so no party's tokens
depend on another party's text. N = 1 is the centralized prompt, one segment, for every split.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from fedattn.errors import FedAttnError

SPLITS = ("TokAg", "SemAg", "TokEx", "SemEx")
SEPARATOR = "\n"


def split_prompt(
    tokenizer: PreTrainedTokenizerBase, exemplars: Sequence[str], question: str, split: str, parties: int
) -> list[list[int]]:
    """Per party, in order (publisher last), its token ids."""
    if split not in SPLITS:
        raise FedAttnError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if parties < 1:
        raise FedAttnError(f"the number of parties must be >= 1, got {parties}")
    context = SEPARATOR.join(exemplars)
    if parties == 1:
        return [_tokenize(tokenizer, context + question)]
    if split == "TokAg":
        segments = _cut(_tokenize(tokenizer, context + question), parties, "the prompt")
    elif split == "TokEx":
        exemplar_ids, question_ids = _tokens_around(tokenizer, context, question)
        segments = _cut(exemplar_ids, parties - 1, "the exemplars") + [question_ids]
    else:
        units = [_tokenize(tokenizer, text) for text in _exemplar_units(exemplars)]
        question_ids = _tokenize(tokenizer, question)
        if split == "SemAg":
            segments = _deal(units, parties, minimum_last=0)
            segments[-1] = segments[-1] + question_ids
        else:
            segments = _deal(units, parties - 1, minimum_last=1) + [question_ids]
    _check_nonempty(segments, split)
    return segments


def even_sizes(total: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``total``, differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Raw text to ids; special-token strings inside the text stay plain text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def _tokens_around(tokenizer: PreTrainedTokenizerBase, context: str, question: str) -> tuple[list[int], list[int]]:
    """The whole prompt tokenized once, cut where the question begins.

    A token that spans the boundary (a tokenizer merging across it) goes to the question side, so
    no collaborator holds any of the question.
    """
    encoding = tokenizer(
        context + question, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
    )
    ids, offsets = encoding.input_ids, encoding.offset_mapping
    boundary = next((index for index, (_, end) in enumerate(offsets) if end > len(context)), len(ids))
    return ids[:boundary], ids[boundary:]


def _exemplar_units(exemplars: Sequence[str]) -> list[str]:
    """Each exemplar with the separator that precedes it in the joined prompt."""
    return [(SEPARATOR if index else "") + text for index, text in enumerate(exemplars)]


def _cut(ids: list[int], parts: int, what: str) -> list[list[int]]:
    if len(ids) < parts:
        raise FedAttnError(f"{what} has {len(ids)} tokens, too few to cut among {parts} parties")
    segments, start = [], 0
    for size in even_sizes(len(ids), parts):
        segments.append(ids[start : start + size])
        start += size
    return segments


def _deal(units: list[list[int]], parts: int, minimum_last: int) -> list[list[int]]:
    """Contiguous groups of whole units; every group but the last needs at least one unit, the
    last at least ``minimum_last`` (SemAg's publisher may hold only the question)."""
    needed = parts - 1 + minimum_last
    if len(units) < needed:
        raise FedAttnError(
            f"{len(units)} exemplars cannot be dealt as whole units: the split needs at least {needed} "
            "(use more --shots or fewer --parties)"
        )
    groups, start = [], 0
    for size in even_sizes(len(units), parts):
        groups.append([token for unit in units[start : start + size] for token in unit])
        start += size
    return groups


def _check_nonempty(segments: list[list[int]], split: str) -> None:
    for rank, segment in enumerate(segments):
        if not segment:
            raise FedAttnError(f"{split}: party {rank + 1} of {len(segments)} would hold no tokens")
