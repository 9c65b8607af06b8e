"""The ``units`` task domain: unit conversion with a worked chain, which the reference model never saw.

``Q: How many minutes are in 3 hours and 25 minutes?\\nA: 3*60=180. 180+25=205. The answer is 205.``

It exists to measure what fine-tuning on a new domain costs the old ones: the bundled reference model
was trained on the four domains of `moetrim.data.tasks` only, and its word-level tokenizer has no
token for these unit words (they are spelled by characters), as a new domain would be for a real
model. The chain is the math domain's (``a*b=c. c+d=e. The answer is e.``); the big quantity has one
digit, so the new skill is the conversion factor of each unit pair and its times table, plus sums
up to 999 (the math domain stops at 99). Results stay at most 999.

The split key is the unit pair, the operation and the two numbers; the phrasing is not part of it,
so an eval computation is never a training computation asked in other words.
"""

from __future__ import annotations

import random

# (big unit singular, plural, small unit singular, plural, small units per big unit)
UNIT_PAIRS: tuple[tuple[str, str, str, str, int], ...] = (
    ("hour", "hours", "minute", "minutes", 60),
    ("minute", "minutes", "second", "seconds", 60),
    ("day", "days", "hour", "hours", 24),
    ("week", "weeks", "day", "days", 7),
    ("year", "years", "month", "months", 12),
    ("foot", "feet", "inch", "inches", 12),
    ("dozen", "dozen", "item", "items", 12),
    ("yard", "yards", "foot", "feet", 3),
    ("gallon", "gallons", "quart", "quarts", 4),
    ("pound", "pounds", "ounce", "ounces", 16),
    ("meter", "meters", "centimeter", "centimeters", 100),
    ("decade", "decades", "year", "years", 10),
)

# Per operation, its phrasings ({a} {B}: the big quantity, {b} {S}: the small one, {T}: small unit plural).
_PHRASINGS: dict[str, tuple[str, ...]] = {
    "+": ("How many {T} are in {a} {B} and {b} {S}?",
          "Convert {a} {B} and {b} {S} to {T}.",
          "What is {a} {B} and {b} {S} in {T}?"),
    "-": ("How many {T} are in {a} {B} less {b} {S}?",
          "Convert {a} {B} minus {b} {S} to {T}.",
          "What is {a} {B} minus {b} {S} in {T}?"),
}
MAX_RESULT = 999
MAX_BIG = 9  # one digit: the product is a times-table fact per unit pair (108 of them), learnable by fine-tuning


def units_problem(rng: random.Random) -> tuple[str, str, str]:
    """One conversion ``(question, answer, key)``: a big and a small quantity to small units, added or
    subtracted (the small quantity is less than one big unit, so a subtraction never goes below 0)."""
    big1, big_n, small1, small_n, factor = rng.choice(UNIT_PAIRS)
    op = rng.choice(tuple(_PHRASINGS))
    a = rng.randint(1, min(MAX_BIG, (MAX_RESULT - (factor - 1)) // factor))
    b = rng.randint(1, factor - 1)
    c = a * factor
    e = c + b if op == "+" else c - b
    question = rng.choice(_PHRASINGS[op]).format(a=a, B=big1 if a == 1 else big_n, b=b, S=small1 if b == 1 else small_n, T=small_n)
    answer = f"{a}*{factor}={c}. {c}{op}{b}={e}. The answer is {e}."
    return question, answer, f"units:{big_n}:{small_n}:{op}:{a}:{b}"
