"""Synthetic task suite used to train the reference MoEs and to measure what compression keeps.

The first reference model's four domains live here, each a deterministic generator of short
question/answer items:

* ``math``      -- two-step arithmetic word problems with a worked chain (GSM8K-style).
* ``knowledge`` -- recall from a fixed, seeded synthetic fact base (countries and their attributes).
* ``code``      -- the printed output of a tiny Python program.
* ``strings``   -- reverse / sort / uppercase / count on a short random word.

These four (``DOMAINS``, what ``"all"`` means unless a model records its own skills) are what the first
bundled reference model was trained on. ``NEW_DOMAINS`` are the ones it never saw: ``units`` (unit
conversion with a worked chain, `moetrim.data.units`), the long-tail model's new skills ``sorting``,
``cipher``, ``calendar`` (`moetrim.data.skills`) and ``people`` (a second fact base,
`moetrim.data.people`), and ``dates`` (date word problems, `moetrim.data.dates`), a fine-tuning domain
no bundled model trains on. ``TASK_DOMAINS`` is all of them.

Every item is ``prompt = "Q: ...\\nA:"`` followed by ``completion = " <answer>\\n"``; the newline ends the
answer, so greedy decoding stops there and exact match is taken on the stripped text before it.

Splits are disjoint at the level of the computation, not only as strings: an item's split is a function
of a SHA-256 hash of its *key*, what it asks the model to compute with names and wording taken out.
math: the operation and its numbers (a name or an object never moves an item to another split, so no
eval problem is a training problem with another name); code: the program with its variable names
normalised; strings: the operation, the string and the letter. Math is also asked in phrasings no
training item uses: each operation has several (its clauses worded with any verb of their sign), a
quarter of them are held out, and half of the eval math items use one of those.
For the fact-base domains (``knowledge``, ``people``) the splits use disjoint sets of question templates
over the same facts: recall of the facts *is* that domain's skill, so the facts are shared and only the
questions' phrasing is held out.
The training script probes on the calib split; eval is a test split nothing trains or tunes on.
Nothing depends on Python's ``hash()``.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Callable

from moetrim.data.core import DEFAULT_SIZES, SPLITS, TaskItem, question as _q, split_of as _split_of, stable_int as _stable_int
from moetrim.data.dates import dates_problem
from moetrim.data.people import build_people, people_questions
from moetrim.data.skills import calendar_problem, cipher_problem, sorting_problem
from moetrim.data.units import units_problem

DOMAINS: tuple[str, ...] = ("math", "knowledge", "code", "strings")
# Never seen by the first reference model, so not part of its "all": units (its fine-tuning domain), the
# long-tail model's new skills, and dates (a fine-tuning domain for the long-tail model).
NEW_DOMAINS: tuple[str, ...] = ("units", "sorting", "cipher", "calendar", "people", "dates")
TASK_DOMAINS: tuple[str, ...] = DOMAINS + NEW_DOMAINS

__all__ = ["DEFAULT_SIZES", "DOMAINS", "NEW_DOMAINS", "SPLITS", "TASK_DOMAINS", "TaskItem", "calibration_texts",
           "fact_base", "get_items", "parse_domains", "people_base", "to_sft_records", "vocabulary_words"]

# Fixed seed of the knowledge fact base: the facts are part of the reference model, never re-rolled.
FACT_SEED = 20240611
NUM_ENTITIES = 128


# --------------------------------------------------------------------------------------------- math

_NAMES = ("Ann", "Bob", "Cal", "Dee", "Eli", "Fay", "Gus", "Ida", "Jon", "Kim",
          "Lou", "Max", "Ned", "Ola", "Pam", "Ray", "Sue", "Tom", "Uma", "Viv")
_OBJECTS = ("apples", "pens", "cards", "eggs", "coins", "books", "shells",
            "stamps", "marbles", "cups", "rocks", "beads")


# Each operation is asked in several phrasings: its clauses in a fixed order, each clause worded with
# any verb of its sign. Training sees most combinations; every fourth combination of each operation
# (never the first, the canonical one) is held out for eval, which asks half of its items that way. A
# held-out phrasing is a new combination of verbs the model knows, so eval tests whether it reads the
# operation from the words rather than recognising a memorised template.
_ADD_MORE = ("buys {x} more", "gets {x} more", "finds {x} more")
_ADD = ("finds {x}", "buys {x}", "gets {x}")
_TAKE = ("gives {x} away", "loses {x}", "sells {x}", "eats {x}")
_ADD_VERBS = ("buys", "gets", "finds")


def _math_phrasings() -> tuple[tuple[str, ...], ...]:
    """Per operation kind, every phrasing (the canonical one first)."""
    def fill(pattern: str, **clauses: str) -> str:
        slots = {k: "{" + k + "}" for k in "nabco"}
        slots.update({k: v.replace("{x}", "{" + k + "}") for k, v in clauses.items()})
        return pattern.format(**slots)

    return (
        tuple(fill("{n} has {a} {o}, {b} and {c}. How many now?", b=p, c=m) for p in _ADD_MORE for m in _TAKE),  # a + b - c
        tuple(fill("{n} has {a} {o}, {b} and then {c}. How many now?", b=m, c=p) for m in _TAKE[1:] + _TAKE[:1] for p in _ADD),  # a - b + c
        tuple(f"{{n}} has {{a}} {{o}} and {v} {{b}} packs of {{c}}. How many now?" for v in _ADD_VERBS),  # a + b * c
        tuple(fill(f"{{n}} {v} {{a}} boxes of {{b}} {{o}} and {{c}}. How many left?", c=m) for v in _ADD_VERBS for m in _TAKE),  # a * b - c
        tuple(f"{{n}} has {{a}} {{o}}, {v} {{b}} on Monday and {{c}} on Tuesday. How many now?" for v in _ADD_VERBS[1:] + _ADD_VERBS[:1]),  # a + b + c
        tuple(fill("{n} has {a} {o}, {b} and {c}. How many left?", b=m1, c=m2)
              for m1 in _TAKE[2:] + _TAKE[:2] for m2 in _TAKE[3:] + _TAKE[:3] if m1 != m2),  # a - b - c
    )


def _held_out(count: int) -> set[int]:
    """Indices of the held-out phrasings of an operation with `count`: every fourth, or the last one."""
    return {i for i in range(1, count) if i % 4 == 0} or {count - 1}


_MATH_PHRASINGS = _math_phrasings()
_MATH_TRAIN_PHRASINGS = tuple(tuple(p for i, p in enumerate(ps) if i not in _held_out(len(ps))) for ps in _MATH_PHRASINGS)
_MATH_HELD_OUT_PHRASINGS = tuple(tuple(p for i, p in enumerate(ps) if i in _held_out(len(ps))) for ps in _MATH_PHRASINGS)
_MATH_TEMPLATES = tuple(ps[0] for ps in _MATH_PHRASINGS)  # the canonical phrasing of each operation


def _math_item(rng: random.Random, split: str = "train") -> TaskItem:
    """A two-operation word problem whose answer is the worked chain plus the final number."""
    name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    kind = rng.randrange(len(_MATH_TEMPLATES))
    held_out = split == "eval" and rng.random() < 0.5
    template = rng.choice((_MATH_HELD_OUT_PHRASINGS if held_out else _MATH_TRAIN_PHRASINGS)[kind])
    while True:
        if kind == 0:  # a + b - c
            a, b, c = rng.randint(2, 49), rng.randint(2, 49), rng.randint(2, 29)
            s = a + b
            r = s - c
            chain = f"{a}+{b}={s}. {s}-{c}={r}."
        elif kind == 1:  # a - b + c
            a = rng.randint(10, 60)
            b, c = rng.randint(2, a - 1), rng.randint(2, 39)
            s = a - b
            r = s + c
            chain = f"{a}-{b}={s}. {s}+{c}={r}."
        elif kind == 2:  # a + b * c
            a, b, c = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 9)
            s = b * c
            r = a + s
            chain = f"{b}*{c}={s}. {a}+{s}={r}."
        elif kind == 3:  # a * b - c
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            s = a * b
            c = rng.randint(1, s - 1)
            r = s - c
            chain = f"{a}*{b}={s}. {s}-{c}={r}."
        elif kind == 4:  # a + b + c
            a, b, c = rng.randint(2, 39), rng.randint(2, 29), rng.randint(2, 29)
            s = a + b
            r = s + c
            chain = f"{a}+{b}={s}. {s}+{c}={r}."
        else:  # a - b - c
            a = rng.randint(20, 99)
            b = rng.randint(2, a // 2)
            s = a - b
            c = rng.randint(1, s - 1)
            r = s - c
            chain = f"{a}-{b}={s}. {s}-{c}={r}."
        if 0 <= s <= 99 and 0 <= r <= 99:
            question = template.format(n=name, a=a, b=b, c=c, o=obj)
            return TaskItem("math", _q(question), f"{chain} The answer is {r}.", key=f"math:{kind}:{a}:{b}:{c}")


# ----------------------------------------------------------------------------------------- knowledge

_ATTRIBUTES = ("capital", "language", "color", "animal")
_COLORS = ("red", "blue", "green", "gold", "white", "black", "purple", "orange", "silver", "gray")
_ANIMALS = ("fox", "owl", "bear", "wolf", "hawk", "deer", "lynx", "crane",
            "otter", "heron", "bison", "eagle", "seal", "hare", "swan", "moose")
_LANGUAGES = ("Orvish", "Tulan", "Kesh", "Marric", "Elvane", "Doric", "Vosk", "Pellan",
              "Ustri", "Garish", "Nomic", "Zentic", "Brevan", "Hollic", "Samic", "Irvan")

# How each attribute is named in questions.
_ATTRIBUTE_PHRASES = {"capital": "capital", "language": "language", "color": "flag color",
                      "animal": "national animal"}

# Question forms per split ({a}: attribute phrase, {e}: entity). Train has many phrasings, with the entity
# at the start, middle and end, so the model learns to key on entity + attribute; calib and eval forms
# never occur in training (eval reuses train words in new orders so no eval-only word is unseen).
_KNOWLEDGE_FORMS: dict[str, tuple[str, ...]] = {
    "train": ("What is the {a} of {e}?", "Name the {a} of {e}.", "{e} has which {a}?",
              "{e}'s {a} is what?", "Which {a} does {e} have?", "In {e}, the {a} is what?"),
    "calib": ("Give the {a} of {e}.",),
    "eval": ("Which is the {a} of {e}?", "What is {e}'s {a}?"),
}


def _made_up_word(rng: random.Random, syllables: int, ending: str) -> str:
    onsets = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "tr", "st")
    vowels = ("a", "e", "i", "o", "u")
    word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)) + ending
    return word.capitalize()


def fact_base() -> dict[str, dict[str, str]]:
    """The fixed synthetic facts: entity -> {attribute: value} (a copy). Same on every machine and run."""
    return {entity: dict(attrs) for entity, attrs in _fact_base().items()}


@lru_cache(maxsize=1)
def _fact_base() -> dict[str, dict[str, str]]:
    rng = random.Random(FACT_SEED)
    used: set[str] = set()
    facts: dict[str, dict[str, str]] = {}
    while len(facts) < NUM_ENTITIES:
        entity = _made_up_word(rng, rng.choice((2, 3)), rng.choice(("", "n", "r", "l", "ria")))
        capital = _made_up_word(rng, 1, rng.choice(("port", "vale", "ford", "ton", "mere", "holm", "wick")))
        if entity in used or capital in used:
            continue
        used.update((entity, capital))
        facts[entity] = {
            "capital": capital,
            "language": rng.choice(_LANGUAGES),
            "color": rng.choice(_COLORS),
            "animal": rng.choice(_ANIMALS),
        }
    return facts


@lru_cache(maxsize=None)
def _knowledge_pool(split: str) -> tuple[TaskItem, ...]:
    """Every knowledge item of a split, in a fixed canonical order."""
    items = []
    for entity, attrs in _fact_base().items():
        for attr in _ATTRIBUTES:
            for form in _KNOWLEDGE_FORMS[split]:
                question = form.format(a=_ATTRIBUTE_PHRASES[attr], e=entity)
                items.append(TaskItem("knowledge", _q(question), attrs[attr]))
    return tuple(items)


def people_base() -> dict[str, dict[str, str]]:
    """The second fact base (`moetrim.data.people`): person -> {city, job, pet} (a copy)."""
    return {person: dict(attrs) for person, attrs in _people_base().items()}


@lru_cache(maxsize=1)
def _people_base() -> dict[str, dict[str, str]]:
    # Cities are the first base's capitals; no person is named like a word the first model's domains use.
    cities = tuple(attrs["capital"] for attrs in _fact_base().values())
    return build_people(cities, frozenset(vocabulary_words()))


@lru_cache(maxsize=None)
def _people_pool(split: str) -> tuple[TaskItem, ...]:
    return tuple(TaskItem("people", _q(q), a) for q, a in people_questions(_people_base(), split))


# ---------------------------------------------------------------------------------------------- code

_VARS = "abcdmnpqrstuvwxyz"


def _code_item(rng: random.Random, split: str = "train") -> TaskItem:
    """A one-line program using variables, reassignment, lists, max/min or a conditional.

    The answer is the printed value with no worked steps, so arithmetic operands are single digits (the
    model must look variables up and compute in one pass); the math domain carries multi-digit chains.
    """
    v1, v2 = rng.sample(_VARS, 2)
    kind = rng.randrange(6)
    while True:
        if kind == 0:  # two variables, one operation
            op = rng.choice("+-*")
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            prog = f"{v1}={a};{v2}={b};print({v1}{op}{v2})"
            out = a + b if op == "+" else a - b if op == "-" else a * b
        elif kind == 1:  # composition through a second variable
            a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 4)
            op1, op2 = rng.choice("+-"), rng.choice("+*")
            y = a + b if op1 == "+" else a - b
            out = y + c if op2 == "+" else y * c
            prog = f"{v1}={a};{v2}={v1}{op1}{b};print({v2}{op2}{c})"
        elif kind == 2:  # reassignment
            a, b = rng.randint(0, 19), rng.randint(1, 9)
            op = rng.choice("+-")
            out = a + b if op == "+" else a - b
            prog = f"{v1}={a};{v1}={v1}{op}{b};print({v1})"
        elif kind == 3:  # list indexing
            vals = [rng.randint(0, 99) for _ in range(3)]
            i = rng.choice((0, 1, 2, -1))
            out = vals[i]
            prog = f"{v1}=[{vals[0]},{vals[1]},{vals[2]}];print({v1}[{i}])"
        elif kind == 4:  # max / min
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            fn = rng.choice(("max", "min"))
            out = max(a, b) if fn == "max" else min(a, b)
            prog = f"{v1}={a};{v2}={b};print({fn}({v1},{v2}))"
        else:  # conditional expression
            a, t = rng.randint(0, 9), rng.randint(0, 9)
            yes, no = rng.randint(0, 99), rng.randint(0, 99)
            out = yes if a > t else no
            prog = f"{v1}={a};print({yes} if {v1}>{t} else {no})"
        if 0 <= out <= 99:
            return TaskItem("code", _q(prog), str(out), key=f"code:{normalise_program(prog)}")


def normalise_program(prog: str) -> str:
    """The program with its variables renamed x0, x1, ... in order of first use (names are one letter;
    keywords are longer), so two programs that compute the same thing get the same text."""
    names: dict[str, str] = {}
    return re.sub(r"\b[a-z]\b", lambda m: names.setdefault(m.group(), f"x{len(names)}"), prog)


# ------------------------------------------------------------------------------------------- strings

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


_STRINGS_TEMPLATES = (
    "Reverse {w}.",
    "Sort the letters of {w}.",
    "Write {w} in uppercase.",
    "How many {c}'s are in {w}?",
    "How many letters are in {w}?",
)


def _strings_item(rng: random.Random, split: str = "train") -> TaskItem:
    """A letter-level operation on a random lowercase string (never a word of the suite's vocabulary,
    so a word-level tokenizer cannot hide its letters)."""
    kind = rng.randrange(len(_STRINGS_TEMPLATES))
    reserved = _reserved_lowercase()
    while True:
        length = rng.randint(3, 6)
        word = "".join(rng.choice(_LETTERS) for _ in range(length))
        if word not in reserved:
            break
    letter = rng.choice(word) if rng.random() < 0.75 else rng.choice(_LETTERS)
    question = _STRINGS_TEMPLATES[kind].format(w=word, c=letter)
    answer = (word[::-1], "".join(sorted(word)), word.upper(), str(word.count(letter)), str(len(word)))[kind]
    return TaskItem("strings", _q(question), answer, key=f"strings:{kind}:{word}:{letter if kind == 3 else ''}")


_CODE_KEYWORDS = ("print", "max", "min", "if", "else")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]{2,}", re.sub(r"\{[a-z]\}", " ", text)))


@lru_cache(maxsize=1)
def vocabulary_words() -> tuple[str, ...]:
    """Every word the train split is built from (templates, names, facts, keywords), sorted.

    A tokenizer may give each of these a token of its own; calib/eval-only template words are left out
    on purpose so that they never get embeddings that training did not touch.
    """
    words: set[str] = set()
    for text in (*(p for ps in _MATH_TRAIN_PHRASINGS for p in ps), *_STRINGS_TEMPLATES, "Q: A: The answer is", *_CODE_KEYWORDS):
        words |= _words(text)
    words |= set(_NAMES) | set(_OBJECTS)
    for form in _KNOWLEDGE_FORMS["train"]:
        words |= _words(form)
    for phrase in _ATTRIBUTE_PHRASES.values():
        words |= _words(phrase)
    for entity, attrs in _fact_base().items():
        words |= _words(entity) | set().union(*(_words(v) for v in attrs.values()))
    return tuple(sorted(words))


@lru_cache(maxsize=1)
def _reserved_lowercase() -> frozenset[str]:
    return frozenset(w.lower() for w in vocabulary_words())


def _problem_domain(domain: str, problem: Callable[[random.Random], tuple[str, str, str]]) -> Callable[[random.Random, str], TaskItem]:
    """A generator of ``domain`` items from a ``(question, answer, key)`` function; its key alone decides its split."""
    def item(rng: random.Random, split: str = "train") -> TaskItem:
        question, answer, key = problem(rng)
        return TaskItem(domain, _q(question), answer, key=key)

    return item


_units_item = _problem_domain("units", units_problem)

_GENERATORS: dict[str, Callable[[random.Random, str], TaskItem]] = {
    "math": _math_item,
    "code": _code_item,
    "strings": _strings_item,
    "units": _units_item,
    "sorting": _problem_domain("sorting", sorting_problem),
    "cipher": _problem_domain("cipher", cipher_problem),
    "calendar": _problem_domain("calendar", calendar_problem),
    "dates": _problem_domain("dates", dates_problem),
}
# Fact-base domains: a fixed pool of items per split (the facts are shared, the question forms are not).
_POOLS: dict[str, Callable[[str], tuple[TaskItem, ...]]] = {"knowledge": _knowledge_pool, "people": _people_pool}


# ----------------------------------------------------------------------------------------------- API


def _check(domain: str, split: str) -> None:
    if domain not in TASK_DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(TASK_DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def get_items(domain: str, split: str, n: int | None = None, seed: int = 0) -> list[TaskItem]:
    """``n`` distinct items of ``domain`` from ``split``; same arguments always give the same list.

    ``n=None`` gives ``DEFAULT_SIZES[split]`` items (for a fact-base domain's train split: every item).
    """
    _check(domain, split)
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if domain in _POOLS:
        pool = list(_POOLS[domain](split))
        # knowledge keeps its original shuffle seed (its items must not change); other pools are seeded by name
        random.Random(_stable_int(domain, split, seed)).shuffle(pool)
        if n is None:
            return pool if split == "train" else pool[: DEFAULT_SIZES[split]]
        if n > len(pool):
            raise ValueError(f"{domain}/{split} has only {len(pool)} distinct items, asked for {n}")
        return pool[:n]

    want = DEFAULT_SIZES[split] if n is None else n
    gen = _GENERATORS[domain]
    rng = random.Random(_stable_int(domain, split, seed))
    seen: set[str] = set()
    items: list[TaskItem] = []
    misses = 0
    while len(items) < want:
        item = gen(rng, split)
        if item.prompt in seen or _split_of(item.key) != split:
            misses += 1
            # the space is spent when new items stop coming (units/train holds about 14,000): say so at once,
            # not after 50 misses for every item asked
            if misses > 10_000 + 5 * len(items):
                raise ValueError(f"could not draw {want} distinct {domain}/{split} items (found {len(items):,})")
            continue
        seen.add(item.prompt)
        items.append(item)
        misses = 0
    return items


def calibration_texts(domains: list[str] | None = None, n_per_domain: int = 64, seed: int = 0) -> list[str]:
    """Calibration texts from the calib split, interleaved across domains so any prefix is mixed."""
    names = list(DOMAINS) if domains is None else list(domains)
    for d in names:
        _check(d, "calib")
    per = [get_items(d, "calib", n_per_domain, seed) for d in names]
    return [items[i].text for i in range(n_per_domain) for items in per]


def to_sft_records(items: list[TaskItem]) -> list[dict[str, str]]:
    """``{"prompt", "response"}`` records, the fine-tuning format `moetrim.data.text` reads (the response
    keeps its leading space and end-of-answer newline, so prompt + response is the item's text)."""
    return [{"prompt": item.prompt, "response": item.completion} for item in items]


def parse_domains(spec: str, all_domains: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Parse a CLI domain list such as ``"math,units"`` or ``"all"`` (order kept, duplicates dropped).

    ``"all"`` is ``all_domains``: the skills a model was trained on (`moetrim.assets.trained_domains`),
    by default the first reference model's four; any other domain is asked for by name."""
    every = tuple(DOMAINS if all_domains is None else all_domains)
    valid = f"valid domains: {', '.join(TASK_DOMAINS)} (or 'all' for {', '.join(every)})"
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"no domains given; {valid}")
    out: list[str] = []
    for p in parts:
        if p.lower() == "all":
            names = list(every)
        elif p in TASK_DOMAINS:
            names = [p]
        else:
            raise ValueError(f"unknown domain {p!r}; {valid}")
        out.extend(d for d in names if d not in out)
    return out
