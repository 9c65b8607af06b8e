"""The ``dates`` fine-tuning domain: date word problems that need calendar arithmetic, a rare skill.

``Q: Ann finds cups on March 25 and more 1 week and 3 days later. What date is it then?``
``A: 1 week and 3 days is 10 days. 25+10=35. March has 31 days. 35-31=4. The answer is April 4.``

No reference model trains on it. The long-tail model learned the pieces elsewhere: weeks and days
to days is a ``units`` conversion, and the rest is the rare ``calendar`` skill's chain. What
fine-tuning must add is the composition, asked in words the model's tokenizer was trained on
(math's names, objects and verbs, calendar's and units' words), so it tests learning a new task
rather than spelling. The duration is 1 to 3 weeks and 1 to 6 days (8 to 27 days, as calendar's).

The conversion is said in words, not as units' two arithmetic steps. With those steps every answer
opened with two ``a op b = c.`` steps and went on with a third, and fine-tuning taught the model
that math's and units' two-step chains go on too: at lr 1e-4 math fell to 0.0-0.07 on the
long-tail model whose digits are tokens of their own (docs/reference-model.md). Said in words, the
arithmetic part is calendar's chain as it is, and math survives.

An item's key is the calendar computation it contains (month, day, days added), so its split is the
split of that computation in the ``calendar`` skill: no eval date problem asks a date sum the model
trained on in either domain.
"""

from __future__ import annotations

import random

from moetrim.data.skills import MONTHS, calendar_key, date_chain, days

_NAMES = ("Ann", "Bob", "Cal", "Dee", "Eli", "Fay", "Gus", "Ida", "Jon", "Kim",
          "Lou", "Max", "Ned", "Ola", "Pam", "Ray", "Sue", "Tom", "Uma", "Viv")  # the math domain's
_OBJECTS = ("apples", "pens", "cards", "eggs", "coins", "books", "shells", "stamps", "marbles", "cups", "rocks", "beads")

DATES_PHRASINGS: tuple[str, ...] = (
    "{n} finds {o} on {m} {d} and more {w} and {x} later. What date is it then?",
    "{n} buys {o} on {m} {d} and then buys more {w} and {x} later. What date is it?",
    "{n} gets {o} on {m} {d} and gets more {w} and {x} after. What is the date then?",
)


def _weeks(w: int) -> str:
    return f"{w} week" if w == 1 else f"{w} weeks"


def dates_problem(rng: random.Random) -> tuple[str, str, str]:
    """``(question, answer, key)``: a date plus ``w`` weeks and ``x`` days, with the whole worked chain."""
    month = rng.randrange(12)
    day = rng.randint(1, MONTHS[month][1])
    w, x = rng.randint(1, 3), rng.randint(1, 6)
    k = 7 * w + x
    question = rng.choice(DATES_PHRASINGS).format(
        n=rng.choice(_NAMES), o=rng.choice(_OBJECTS), m=MONTHS[month][0], d=day, w=_weeks(w), x=days(x))
    answer = f"{_weeks(w)} and {days(x)} is {days(k)}. " + date_chain(month, day, k)
    return question, answer, calendar_key(month, day, k)
