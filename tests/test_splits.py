import pytest

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks import gsm8k
from fedattn.runtime.tiny_model import build_tiny_tokenizer
from fedattn.systems.fedattn.splits import SPLITS, even_sizes, split_prompt

EXEMPLARS = [
    "Question: 1+1?\nLet's think step by step\n1+1=2\nThe answer is 2",
    "Question: 2*3?\nLet's think step by step\n2*3=6\nThe answer is 6",
    "Question: 9-4?\nLet's think step by step\n9-4=5\nThe answer is 5",
    "Question: 8/2?\nLet's think step by step\n8/2=4\nThe answer is 4",
    "Question: 7+7?\nLet's think step by step\n7+7=14\nThe answer is 14",
]
QUESTION = "\nQuestion: 3+4?\nLet's think step by step\n"


@pytest.fixture(scope="module")
def tokenizer():
    """One token per byte: lengths below are character counts."""
    return build_tiny_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def units(exemplars):
    return [("\n" if index else "") + text for index, text in enumerate(exemplars)]


def assert_even(segments, total):
    sizes = [len(segment) for segment in segments]
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1


def test_even_sizes_put_the_extra_tokens_first():
    assert even_sizes(10, 4) == [3, 3, 2, 2]
    assert even_sizes(8, 4) == [2, 2, 2, 2]


@pytest.mark.parametrize("parties", [2, 3, 4, 7])
def test_tokag_cuts_the_whole_sequence_evenly(tokenizer, parties):
    whole = ids(tokenizer, "\n".join(EXEMPLARS) + QUESTION)
    segments = split_prompt(tokenizer, EXEMPLARS, QUESTION, "TokAg", parties)
    assert len(segments) == parties
    assert [token for segment in segments for token in segment] == whole
    assert_even(segments, len(whole))
    question = ids(tokenizer, QUESTION)
    assert segments[-1][-len(question) :] == question


@pytest.mark.parametrize("parties", [2, 3, 4, 7])
def test_tokex_cuts_the_exemplars_evenly_and_leaves_the_publisher_the_question(tokenizer, parties):
    context = "\n".join(EXEMPLARS)
    segments = split_prompt(tokenizer, EXEMPLARS, QUESTION, "TokEx", parties)
    assert len(segments) == parties
    assert segments[-1] == ids(tokenizer, QUESTION)
    assert_even(segments[:-1], len(context))
    assert [token for segment in segments for token in segment] == ids(tokenizer, context + QUESTION)


def test_semag_deals_whole_exemplars_in_contiguous_groups(tokenizer):
    pieces = [ids(tokenizer, text) for text in units(EXEMPLARS)]
    question = ids(tokenizer, QUESTION)
    assert split_prompt(tokenizer, EXEMPLARS[:4], QUESTION, "SemAg", 4) == [
        pieces[0],
        pieces[1],
        pieces[2],
        pieces[3] + question,
    ]
    # 5 exemplars among 3 parties: groups of 2, 2, 1 (larger groups first)
    assert split_prompt(tokenizer, EXEMPLARS, QUESTION, "SemAg", 3) == [
        pieces[0] + pieces[1],
        pieces[2] + pieces[3],
        pieces[4] + question,
    ]
    # fewer exemplars than parties: the publisher may hold the question alone
    assert split_prompt(tokenizer, EXEMPLARS[:3], QUESTION, "SemAg", 4)[-1] == question


def test_semex_deals_whole_exemplars_to_collaborators_only(tokenizer):
    pieces = [ids(tokenizer, text) for text in units(EXEMPLARS)]
    question = ids(tokenizer, QUESTION)
    assert split_prompt(tokenizer, EXEMPLARS, QUESTION, "SemEx", 3) == [
        pieces[0] + pieces[1] + pieces[2],
        pieces[3] + pieces[4],
        question,
    ]
    assert split_prompt(tokenizer, EXEMPLARS[:4], QUESTION, "SemEx", 5) == [*pieces[:4], question]


@pytest.mark.parametrize("split", SPLITS)
def test_one_party_is_the_centralized_prompt(tokenizer, split):
    assert split_prompt(tokenizer, EXEMPLARS, QUESTION, split, 1) == [ids(tokenizer, "\n".join(EXEMPLARS) + QUESTION)]


@pytest.mark.parametrize("split", SPLITS)
def test_real_gsm8k_prompt_concatenates_to_the_centralized_text(tokenizer, split):
    train, test = gsm8k.load("train")[:4], gsm8k.load("test")[0]
    exemplars = [gsm8k.exemplar_text(problem) for problem in train]
    question = gsm8k.question_text(test)
    segments = split_prompt(tokenizer, exemplars, question, split, 4)
    assert tokenizer.decode([token for segment in segments for token in segment]) == "\n".join(exemplars) + question
    assert tokenizer.decode(segments[-1]).endswith(question)


@pytest.mark.parametrize(
    ("split", "exemplars", "parties", "message"),
    [
        ("SemEx", EXEMPLARS[:2], 4, "2 exemplars cannot be dealt"),
        ("SemAg", EXEMPLARS[:2], 4, "needs at least 3"),
        ("TokEx", [], 3, "too few to cut"),
        ("TokAg", ["ab"], 100, "too few to cut among 100"),
        ("Tok", EXEMPLARS, 2, "unknown split"),
        ("TokAg", EXEMPLARS, 0, "must be >= 1"),
    ],
)
def test_impossible_splits_are_refused(tokenizer, split, exemplars, parties, message):
    with pytest.raises(FedAttnError, match=message):
        split_prompt(tokenizer, exemplars, QUESTION, split, parties)
