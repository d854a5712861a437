import pytest

from fedattn.evaluation.tasks.gsm8k_scoring import extract_answer, gold_answer, is_correct, normalize_number

COMPLETIONS = [
    ("She pays 3 * 6 = 18 dollars.\nThe answer is \\boxed{18}.", "18"),
    ("So the total is 1000 + 234 = 1,234.\nThe answer is 1,234.", "1234"),
    ("Each ticket is $6, so 3 tickets cost $18", "18"),
    ("5 + 7 = 12\nThe answer is 12\n\nQuestion: Tom has 3 apples and 4 pears.", "12"),
    ("The box says 3 but \\boxed{\\$1,050.00} is right; 7 more", "1050"),
    ("The temperature falls 12 - 15 = -3 degrees.\nThe answer is -3.", "-3"),
    ("It ends at -7 after 2 steps", "2"),
    ("He earns 5.00 / 2 = 2.50 per hour.\nThe answer is 2.50", "2.5"),
    ("The answer is: 40%.", "40"),
    ("The answer is 18.0", "18"),
    ("10 - 4 = 6 left, 6 * 2 = 12 total", "12"),
    ("I am not sure how to solve this.", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), COMPLETIONS)
def test_final_number_of_a_completion(text, expected):
    assert extract_answer(text) == expected


def test_boxed_beats_answer_is_beats_last_number():
    assert extract_answer("The answer is 5. \\boxed{6} then 7") == "6"
    assert extract_answer("The answer is 5. Then 7 more") == "5"


@pytest.mark.parametrize(
    ("solution", "gold"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", "72"),
        ("#### 1,072", "1072"),
        ("72", "72"),
        ("#### -4", "-4"),
    ],
)
def test_gold_is_the_number_after_hashes(solution, gold):
    assert gold_answer(solution) == gold


def test_exact_match_ignores_formatting_only():
    assert is_correct("The answer is $2.50.", "#### 2.5")
    assert is_correct("The answer is 1,234", "1234")
    assert not is_correct("The answer is 2.51", "2.5")
    assert not is_correct("no idea", "0")


@pytest.mark.parametrize(
    ("raw", "normal"),
    [("1,234", "1234"), ("$18", "18"), ("25%", "25"), ("2.50", "2.5"), ("18.0", "18"), ("-0", "0"), ("72.", "72")],
)
def test_number_normalisation(raw, normal):
    assert normalize_number(raw) == normal
