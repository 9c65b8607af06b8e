"""What every task domain shares: the item type, the prompt format and the hash that assigns splits.

Kept apart from the domains so that each skill family can live in a module of its own
(`moetrim.data.tasks` holds the first reference model's four, `moetrim.data.skills` and
`moetrim.data.people` the long-tail model's new ones) without importing one another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

SPLITS: tuple[str, ...] = ("train", "calib", "eval")

# Default number of items returned when ``n`` is None (a fact-base domain's train split returns every item).
DEFAULT_SIZES: dict[str, int] = {"train": 20_000, "calib": 256, "eval": 256}

# Share of the hash space given to each split for generated domains (out of 100 buckets).
EVAL_BUCKETS = range(0, 8)
CALIB_BUCKETS = range(8, 16)


@dataclass(frozen=True)
class TaskItem:
    """One question; the model is scored on greedily generating ``answer`` right after ``prompt``.

    ``key`` names the computation (what decides the split): items with one key are one problem."""

    domain: str
    prompt: str
    answer: str
    key: str = field(default="", compare=False)

    @property
    def completion(self) -> str:
        """What follows the prompt in running text: a space, the answer, and the newline that ends it."""
        return " " + self.answer + "\n"

    @property
    def text(self) -> str:
        """Full training / calibration text (prompt + answer + end-of-answer newline)."""
        return self.prompt + self.completion


def stable_int(*parts: object) -> int:
    """A seed derived from ``parts`` that is the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def split_of(key: str) -> str:
    """Split that owns an item with this computation key; a pure function of it, so splits are disjoint."""
    bucket = stable_int("split", key) % 100
    if bucket in EVAL_BUCKETS:
        return "eval"
    if bucket in CALIB_BUCKETS:
        return "calib"
    return "train"


def question(text: str) -> str:
    """The prompt of an item asking ``text``."""
    return f"Q: {text}\nA:"
