"""Answer extraction and accuracy for math SFT evaluation (finetune/answers.py)."""


import pytest

from finetune.answers import (  # noqa: E402
    answer_accuracy,
    answers_equal,
    extract_answer,
    extract_last_number,
    extract_marked,
    parse_number,
)


@pytest.mark.parametrize(
    "text, marked, last",
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "12", "12"),
        ("#### 1,234,567", "1234567", "1234567"),
        ("So the total is 5 + 2 = 7. The answer is: 7", "7", "7"),
        ("The answer is: -3.5.", "-3.5", "-3.5"),
        ("the answer is 42", "42", "42"),  # MetaMathQA casing and colon vary
        ("He spent $1,000.50 in all.", None, "1000.50"),
        ("The fraction is \\frac{3}{4}.", None, "3/4"),
        ("#### \\dfrac{-3}{4}", "-3/4", "-3/4"),
        ("It is 3/4 of the cake", None, "3/4"),
        ("The loss was -$5.", None, "-5"),
        ("The loss was $-5.", None, "-5"),
        ("The rate rose by 50%.", None, "50"),
        ("Pages 3-4 are missing", None, "4"),  # a hyphen after a digit is not a minus sign
        ("1,2,3 and 4", None, "4"),  # commas only group thousands in threes
        ("Version 1.2.3", None, "1.2"),
        ("The answer is: 72\n\nThen add 5 more.", "72", "5"),  # strict and flexible disagree
        ("#### 8\n#### 9", "9", "9"),  # the last marker wins
        ("The answer is:", None, None),
        ("I do not know.", None, None),
        ("", None, None),
        ("\u22127 degrees", None, "-7"),  # unicode minus
    ],
)
def test_extraction_on_tricky_strings(text, marked, last):
    assert extract_marked(text) == marked
    assert extract_last_number(text) == last
    assert extract_answer(text) == (marked if marked is not None else last)


def test_marked_extraction_by_format():
    text = "Step one gives 4.\nThe answer is: 4\n#### 5"
    assert extract_marked(text, "metamathqa") == "4"
    assert extract_marked(text, "gsm8k") == "5"
    assert extract_marked("#### 5", "metamathqa") is None
    with pytest.raises(ValueError, match="unknown answer format"):
        extract_marked(text, "math500")


@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        ("1000", "1,000", True),
        ("1000.00", "1000", True),
        ("0.5", "1/2", True),
        ("\\frac{1}{2}", "0.5", True),
        ("$18", "18", True),
        ("-3", "3", False),
        ("0.333", "1/3", False),  # exact comparison: a rounded decimal is not the fraction
        ("7", None, False),
        (None, "7", False),
        ("1/0", "1/0", False),  # not a number
        ("abc", "abc", False),
    ],
)
def test_numeric_comparison(pred, gold, equal):
    assert answers_equal(pred, gold) is equal


def test_parse_number_is_exact():
    from fractions import Fraction

    assert parse_number("-1,234.5") == Fraction(-2469, 2)
    assert parse_number("3/4") == Fraction(3, 4)
    assert parse_number("none") is None


def test_strict_and_flexible_accuracy():
    generations = [
        "2 + 2 = 4\n#### 4",  # strict and flexible right
        "2 + 3 = 5, so 5",  # no marker: flexible only
        "The answer is: 6\nCheck: 6 - 1 = 5",  # strict right, flexible reads the trailing 5
        "#### 9",  # both wrong
    ]
    golds = ["4", "5", "6", "8"]
    assert answer_accuracy(generations, golds) == {"strict": 0.5, "flexible": 0.5}
    assert answer_accuracy(generations[:2], golds[:2]) == {"strict": 0.5, "flexible": 1.0}
    with pytest.raises(ValueError, match="gold answers"):
        answer_accuracy(generations, golds[:2])
