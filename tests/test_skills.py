"""The long-tail model's new skills and its fine-tuning domain: right answers, disjoint splits, determinism.

Every check reads the computation back from the prompt with its own code (not the suite's keys), so
a split that leaks a computation, or an answer that is wrong, fails here.
"""

from __future__ import annotations

import re

import pytest

from moetrim.data.tasks import DOMAINS, NEW_DOMAINS, TASK_DOMAINS, calibration_texts, fact_base, get_items, parse_domains, people_base

NEW_SKILLS = ("sorting", "cipher", "calendar", "people", "dates")
# Written here apart from the suite's own table: days per month in a year without leap day.
_MONTH_DAYS = {"January": 31, "February": 28, "March": 31, "April": 30, "May": 31, "June": 30, "July": 31,
               "August": 31, "September": 30, "October": 31, "November": 30, "December": 31}
_MONTH_ORDER = list(_MONTH_DAYS)


def _question(prompt: str) -> str:
    assert prompt.startswith("Q: ") and prompt.endswith("\nA:")
    return prompt[3:-3]


def _sorting(prompt: str) -> tuple[str, tuple[int, ...]]:
    q = _question(prompt)
    numbers = tuple(int(x) for x in re.findall(r"\d+", q))
    return ("down" if "large to small" in q else "up"), numbers


def _cipher(prompt: str) -> tuple[str, int]:
    letters, k = re.fullmatch(r"(?:Shift the letters|Move each of the letters) ((?:[a-z] )+)(?:by|on by) (\d)\.", _question(prompt)).groups()
    return letters.replace(" ", ""), int(k)


def _date_sum(prompt: str) -> tuple[str, int, int]:
    """(month, day, days added) of a calendar or dates question."""
    q = _question(prompt)
    month, day = re.search(r"(" + "|".join(_MONTH_DAYS) + r") (\d+)", q).groups()
    weeks = re.search(r"(\d+) weeks? and (\d+) days?", q)
    k = 7 * int(weeks.group(1)) + int(weeks.group(2)) if weeks else int(re.search(r"(\d+) days?", q).group(1))
    return month, int(day), k


def _date_after(month: str, day: int, k: int) -> str:
    total, length = day + k, _MONTH_DAYS[month]
    if total <= length:
        return f"{month} {total}"
    return f"{_MONTH_ORDER[(_MONTH_ORDER.index(month) + 1) % 12]} {total - length}"


def test_new_domains_are_outside_the_first_models_all() -> None:
    assert set(NEW_SKILLS) <= set(NEW_DOMAINS) and not set(NEW_DOMAINS) & set(DOMAINS)
    assert TASK_DOMAINS == DOMAINS + NEW_DOMAINS
    assert parse_domains("all") == list(DOMAINS)
    assert parse_domains("all", ["math", "calendar"]) == ["math", "calendar"]
    assert parse_domains("dates,all", ("code",)) == ["dates", "code"]
    with pytest.raises(ValueError, match="or 'all' for math, calendar"):
        parse_domains("poetry", ["math", "calendar"])


@pytest.mark.parametrize("domain", NEW_SKILLS)
def test_items_are_deterministic_seeded_and_well_formed(domain: str) -> None:
    items = get_items(domain, "eval")
    assert len(items) >= 256 and items == get_items(domain, "eval") and get_items(domain, "eval", 50, seed=1) != items[:50]
    assert len({it.prompt for it in items}) == len(items)
    for it in items:
        assert it.domain == domain and it.answer == it.answer.strip() and "\n" not in it.answer and it.answer
        assert it.text == it.prompt + " " + it.answer + "\n" and len(it.text) <= 224  # far inside 128 tokens (finetune.py's seq_len)
    assert calibration_texts([domain], n_per_domain=4) == [it.text for it in get_items(domain, "calib", 4)]


def test_sorting_answers_and_splits() -> None:
    keys = {}
    for split in ("train", "calib", "eval"):
        items = get_items("sorting", split, 20000 if split == "train" else None)
        for it in items:
            direction, numbers = _sorting(it.prompt)
            assert 3 <= len(numbers) <= 5 and len(set(numbers)) == len(numbers) and max(numbers) < 100
            assert it.answer == " ".join(map(str, sorted(numbers, reverse=direction == "down")))
        keys[split] = {(d, tuple(sorted(ns))) for d, ns in map(lambda it: _sorting(it.prompt), items)}
    # an eval list is never a training list, not even in another order
    assert not keys["train"] & keys["eval"] and not keys["train"] & keys["calib"] and not keys["calib"] & keys["eval"]


def test_cipher_answers_and_splits() -> None:
    keys = {}
    for split in ("train", "calib", "eval"):
        items = get_items("cipher", split, 20000 if split == "train" else None)
        for it in items:
            letters, k = _cipher(it.prompt)
            assert 1 <= k <= 3 and 3 <= len(letters) <= 6
            assert it.answer == " ".join(chr((ord(c) - 97 + k) % 26 + 97) for c in letters)
        keys[split] = {_cipher(it.prompt) for it in items}
    assert not keys["train"] & keys["eval"] and not keys["train"] & keys["calib"] and not keys["calib"] & keys["eval"]


def test_calendar_answers_chain_and_splits() -> None:
    keys, carried = {}, 0
    for split in ("train", "calib", "eval"):
        items = get_items("calendar", split, 9000 if split == "train" else None)
        for it in items:
            month, day, k = _date_sum(it.prompt)
            assert 1 <= day <= _MONTH_DAYS[month] and 1 <= k <= 27
            total, length = day + k, _MONTH_DAYS[month]
            assert it.answer.startswith(f"{day}+{k}={total}. {month} has {length} days. ")
            assert it.answer.endswith(f"The answer is {_date_after(month, day, k)}.")
            carried += f"{total}-{length}={total - length}." in it.answer
        keys[split] = {_date_sum(it.prompt) for it in items}
    assert not keys["train"] & keys["eval"] and not keys["train"] & keys["calib"] and not keys["calib"] & keys["eval"]
    assert len(keys["eval"]) >= 200 and carried > 1000  # both kinds of answer: within the month and carried into the next


def test_dates_needs_calendar_and_units_chains_and_follows_calendars_splits() -> None:
    calendar = {split: {_date_sum(it.prompt) for it in get_items("calendar", split, 9000 if split == "train" else None)}
                for split in ("train", "calib", "eval")}
    for split in ("train", "calib", "eval"):
        items = get_items("dates", split, 3000 if split == "train" else None)
        for it in items:
            month, day, k = _date_sum(it.prompt)
            w, x = divmod(k, 7)
            assert 1 <= w <= 3 and 1 <= x <= 6
            assert it.answer.startswith(f"{w} week{'s' * (w > 1)} and {x} day{'s' * (x > 1)} is {k} days. {day}+{k}={day + k}. {month} has {_MONTH_DAYS[month]} days. ")
            assert it.answer.endswith(f"The answer is {_date_after(month, day, k)}.")
            for other in {"train", "calib", "eval"} - {split}:  # its date sum is never in another split of calendar
                assert (month, day, k) not in calendar[other]
    # every word of a dates question is a word of the long-tail model's training text
    train_words = {w for d in ("math", "units", "calendar") for it in get_items(d, "train", 3000) for w in re.findall(r"[A-Za-z]+", it.text)}
    for it in get_items("dates", "eval"):
        assert set(re.findall(r"[A-Za-z]+", it.prompt)) <= train_words, it.prompt


def test_people_is_a_second_fact_base_asked_in_held_out_forms() -> None:
    people, countries = people_base(), fact_base()
    capitals = {a["capital"] for a in countries.values()}
    assert len(people) == 64 and not set(people) & set(countries)
    assert all(attrs["city"] in capitals for attrs in people.values())
    forms = {}
    for split in ("train", "calib", "eval"):
        items = get_items("people", split)
        assert len(items) >= (1152 if split == "train" else 256)
        shapes = set()
        for it in items:
            person = next(p for p in people if re.search(rf"\b{p}\b", it.prompt))
            attr = {"home city": "city", "job": "job", "pet": "pet"}[re.search(r"home city|job|pet", it.prompt).group()]
            assert it.answer == people[person][attr]
            shapes.add(it.prompt.replace(person, "P").replace("home city", "A").replace("job", "A").replace("pet", "A"))
        forms[split] = shapes
    assert not forms["train"] & forms["eval"] and not forms["train"] & forms["calib"] and not forms["calib"] & forms["eval"]
    with pytest.raises(ValueError, match="only"):
        get_items("people", "eval", 10**5)
