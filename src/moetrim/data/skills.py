"""Skills the long-tail reference model adds to the first model's five: sorting, a cipher, calendar arithmetic.

Each is a deterministic generator of one question; its *key* (what is computed, wording taken out)
decides its split through `moetrim.data.core.split_of`, as for the first model's domains.

* ``sorting``  -- ``Sort 42 7 19 3.`` -> ``3 7 19 42`` (or from large to small); keyed on the direction
  and the multiset of numbers, so an eval list is never a training list in another order.
* ``cipher``   -- ``Shift the letters q z k by 2.`` -> ``s b m``: a Caesar shift of 1 to 3 over spaced
  letters (one token each), keyed on the letters and the shift.
* ``calendar`` -- ``What date is 10 days after March 25?`` -> ``25+10=35. March has 31 days. 35-31=4.
  The answer is April 4.``: a date plus 1 to 27 days in a year without leap day, with a worked chain
  (the sum, the month's length and, past the month's end, the carry into the next month). Keyed on
  the month, the day and the number of days. It is one of the model's rare skills, and the one the
  fine-tuning domain `moetrim.data.dates` builds on.
"""

from __future__ import annotations

import random

MONTHS: tuple[tuple[str, int], ...] = (
    ("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31), ("June", 30),
    ("July", 31), ("August", 31), ("September", 30), ("October", 31), ("November", 30), ("December", 31),
)
MAX_DAYS_AFTER = 27  # the sum never passes the end of the next month: one carry at most

_LETTERS = "abcdefghijklmnopqrstuvwxyz"

SORTING_PHRASINGS: dict[str, tuple[str, ...]] = {
    "up": ("Sort {l}.", "Sort {l} from small to large."),
    "down": ("Sort {l} from large to small.",),
}
CIPHER_PHRASINGS: tuple[str, ...] = ("Shift the letters {w} by {k}.", "Move each of the letters {w} on by {k}.")
CALENDAR_PHRASINGS: tuple[str, ...] = (
    "What date is {k} after {m} {d}?",
    "What date is it {k} after {m} {d}?",
    "What is the date {k} later than {m} {d}?",
)


def sorting_problem(rng: random.Random) -> tuple[str, str, str]:
    """``(question, answer, key)``: three to five distinct numbers below 100, sorted up or down."""
    direction = rng.choice(tuple(SORTING_PHRASINGS))
    numbers = rng.sample(range(100), rng.randint(3, 5))
    ordered = sorted(numbers, reverse=direction == "down")
    question = rng.choice(SORTING_PHRASINGS[direction]).format(l=" ".join(map(str, numbers)))
    return question, " ".join(map(str, ordered)), f"sorting:{direction}:{','.join(map(str, sorted(numbers)))}"


def cipher_problem(rng: random.Random) -> tuple[str, str, str]:
    """``(question, answer, key)``: three to six random letters, each moved ``k`` on in the alphabet (z wraps to a)."""
    letters = [rng.choice(_LETTERS) for _ in range(rng.randint(3, 6))]
    k = rng.randint(1, 3)
    shifted = [_LETTERS[(_LETTERS.index(c) + k) % 26] for c in letters]
    question = rng.choice(CIPHER_PHRASINGS).format(w=" ".join(letters), k=k)
    return question, " ".join(shifted), f"cipher:{''.join(letters)}:{k}"


def days(k: int) -> str:
    return f"{k} day" if k == 1 else f"{k} days"


def date_chain(month: int, day: int, k: int) -> str:
    """The worked answer for ``k`` days after day ``day`` of month index ``month`` (0 = January)."""
    name, length = MONTHS[month]
    total = day + k
    if total <= length:
        return f"{day}+{k}={total}. {name} has {length} days. The answer is {name} {total}."
    carried = total - length
    return f"{day}+{k}={total}. {name} has {length} days. {total}-{length}={carried}. The answer is {MONTHS[(month + 1) % 12][0]} {carried}."


def calendar_key(month: int, day: int, k: int) -> str:
    """The computation of a date plus days (shared with `moetrim.data.dates`, whose splits follow it)."""
    return f"calendar:{month}:{day}:{k}"


def calendar_problem(rng: random.Random) -> tuple[str, str, str]:
    """``(question, answer, key)``: a date plus 1 to ``MAX_DAYS_AFTER`` days."""
    month = rng.randrange(12)
    day = rng.randint(1, MONTHS[month][1])
    k = rng.randint(1, MAX_DAYS_AFTER)
    question = rng.choice(CALENDAR_PHRASINGS).format(k=days(k), m=MONTHS[month][0], d=day)
    return question, date_chain(month, day, k), calendar_key(month, day, k)
