"""
Final-answer extraction and comparison for math SFT evaluation (GSM8K, MetaMathQA).

A generated solution is scored two ways:
- strict: only the dataset's marked answer counts, `#### N` (GSM8K) or `The answer is: N`
  (MetaMathQA); a solution without the marker scores 0 even if the right number is in it.
- flexible: the last number anywhere in the text.

Numbers are read with their sign, thousands commas, decimals, fractions (3/4, \\frac{3}{4}), a `$`
and a `%` (dropped: GSM8K's gold answers are bare numbers), and compared exactly as rationals,
so 0.5 == 1/2 == \\frac{1}{2} and 1,000 == 1000.00.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number: an optional sign (not after a word character, so "3-4" reads as 3 and 4), an optional $,
# then (never starting inside another number) \frac{a}{b}, or an integer or decimal (commas only in
# groups of three) with an optional /denominator.
_NUMBER = re.compile(
    r"""
    (?:(?<![\w.,)])(?P<sign>[-+\u2212])\s*)?(?:\$\s*(?P<sign2>[-+\u2212])?\s*)?(?<![\d.,])
    (?:
        \\[dt]?frac\s*\{\s*(?P<fnum>[-+]?\d+(?:\.\d+)?)\s*\}\s*\{\s*(?P<fden>[-+]?\d+(?:\.\d+)?)\s*\}
      | (?P<num>(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?|\.\d+)(?:\s*/\s*(?P<den>\d+(?:\.\d+)?)(?![\d/]))?
    )
    """,
    re.VERBOSE,
)
_MARKERS = {
    "gsm8k": re.compile(r"####"),
    "metamathqa": re.compile(r"the answer is\s*:?", re.IGNORECASE),
}


def _canonical(m: re.Match) -> str:
    """The matched number as plain text: sign kept, commas/$/% dropped, \\frac{a}{b} as a/b."""
    minus = ("-", "\u2212")
    negative = (m["sign"] in minus) != (m["sign2"] in minus)
    if m["fnum"] is not None:
        fnum, fden = m["fnum"], m["fden"]
        negative ^= fnum.startswith("-") != fden.startswith("-")
        body = f"{fnum.lstrip('+-')}/{fden.lstrip('+-')}"
    else:
        body = m["num"].replace(",", "") + (f"/{m['den']}" if m["den"] else "")
    return ("-" if negative else "") + body


def extract_last_number(text: str) -> str | None:
    """The last number in text (flexible extraction), or None when there is none."""
    last = None
    for m in _NUMBER.finditer(text):
        last = m
    return None if last is None else _canonical(last)


def extract_marked(text: str, fmt: str | None = None) -> str | None:
    """The number after the last `#### ` (fmt "gsm8k") or `The answer is:` ("metamathqa") marker; any of
    them when fmt is None. None when there is no marker or no number right after it (strict extraction)."""
    if fmt is not None and fmt not in _MARKERS:
        raise ValueError(f"unknown answer format {fmt!r}; use one of {', '.join(_MARKERS)}")
    markers = [_MARKERS[fmt]] if fmt else list(_MARKERS.values())
    ends = [m.end() for pat in markers for m in pat.finditer(text)]
    if not ends:
        return None
    tail = text[max(ends):].lstrip()
    m = _NUMBER.match(tail)
    return None if m is None else _canonical(m)


def answer_line_complete(text: str) -> bool:
    """Whether text holds a marked answer whose line has ended (`#### 42` then a newline): decoding can stop
    there, since strict extraction reads nothing after it."""
    ends = [m.end() for pat in _MARKERS.values() for m in pat.finditer(text)]
    if not ends:
        return False
    line, newline, _ = text[max(ends):].lstrip(" \t").partition("\n")
    return bool(newline) and _NUMBER.match(line) is not None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the marked answer when a marker is present, else the last number."""
    marked = extract_marked(text)
    return marked if marked is not None else extract_last_number(text)


def parse_number(s: str | None) -> Fraction | None:
    """An extracted answer (e.g. "-1,234.5", "3/4", "$5", "50%", "\\frac{1}{2}") as an exact rational."""
    if s is None:
        return None
    m = _NUMBER.search(s.strip())
    if m is None:
        return None
    text = _canonical(m)
    try:
        if "/" in text:
            num, den = text.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(pred: str | None, gold: str | None) -> bool:
    """True when both parse as numbers and are equal as rationals (1000 == 1,000.0, 0.5 == 1/2)."""
    a, b = parse_number(pred), parse_number(gold)
    return a is not None and b is not None and a == b


def answer_accuracy(generations: list[str], golds: list[str], fmt: str | None = None) -> dict[str, float]:
    """Strict (marked answer only) and flexible (last number) accuracy of generations against gold answers."""
    if len(generations) != len(golds):
        raise ValueError(f"{len(generations)} generations but {len(golds)} gold answers")
    n = max(1, len(golds))
    strict = sum(answers_equal(extract_marked(g, fmt), a) for g, a in zip(generations, golds))
    flexible = sum(answers_equal(extract_last_number(g), a) for g, a in zip(generations, golds))
    return {"strict": strict / n, "flexible": flexible / n}
