"""The ``people`` skill: recall from a second, smaller fixed fact base (people: home city, job, pet).

A rare skill of the long-tail reference model: few facts, seen little. As for ``knowledge``, recall
of the facts *is* the skill, so every split asks about the same facts and the splits differ in
their question forms: calib and eval use forms no training item uses. A person's home city is a
capital of the first fact base, so the two bases share words (and a model can mix them up).
"""

from __future__ import annotations

import random

PEOPLE_SEED = 20250301
NUM_PEOPLE = 64

_JOBS = ("baker", "pilot", "farmer", "doctor", "sailor", "miner", "tailor", "painter",
         "singer", "guard", "judge", "cook", "weaver", "smith", "nurse", "clerk")
_PETS = ("cat", "dog", "parrot", "rabbit", "turtle", "goat", "pony", "hamster")
ATTRIBUTES: dict[str, str] = {"city": "home city", "job": "job", "pet": "pet"}  # attribute -> how questions name it

# Question forms per split ({a}: attribute phrase, {p}: person). Train has several, with the person at
# the start, middle and end; calib and eval forms never occur in training, in words training uses.
PEOPLE_FORMS: dict[str, tuple[str, ...]] = {
    "train": ("What {a} does {p} have?", "Name {p}'s {a}.", "{p} has which {a}?",
              "Tell me the {a} of {p}.", "The {a} of {p} is what?", "For {p}, the {a} is what?"),
    "calib": ("Name the {a} of {p}.", "What is the {a} of {p}?"),
    "eval": ("Which {a} does {p} have?", "{p}'s {a} is what?"),
}


def _person_name(rng: random.Random) -> str:
    onsets = ("b", "d", "f", "h", "j", "k", "l", "m", "n", "r", "s", "t", "v", "w", "y", "z", "sh", "th")
    vowels = ("a", "e", "i", "o", "u", "ai", "ee")
    word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2)) + rng.choice(("", "n", "s", "la", "ra", "do"))
    return word.capitalize()


def build_people(cities: tuple[str, ...], taken: frozenset[str]) -> dict[str, dict[str, str]]:
    """The fixed people fact base: ``NUM_PEOPLE`` made-up names (none in ``taken``), each with a home city
    from ``cities``, a job and a pet. Same on every machine and run."""
    rng = random.Random(PEOPLE_SEED)
    facts: dict[str, dict[str, str]] = {}
    lowered = {t.lower() for t in taken}
    while len(facts) < NUM_PEOPLE:
        name = _person_name(rng)
        if name in facts or name.lower() in lowered:
            continue
        facts[name] = {"city": rng.choice(cities), "job": rng.choice(_JOBS), "pet": rng.choice(_PETS)}
    return facts


def people_questions(facts: dict[str, dict[str, str]], split: str) -> list[tuple[str, str]]:
    """Every ``(question, answer)`` of a split, in a fixed canonical order."""
    return [(form.format(a=ATTRIBUTES[attr], p=person), attrs[attr])
            for person, attrs in facts.items() for attr in ATTRIBUTES for form in PEOPLE_FORMS[split]]
