"""Data for moetrim's lm-eval tasks: the eval split of `moetrim.data.tasks`, built when lm-eval loads a task.

Generated at load time (lm-eval's `custom_dataset`) rather than shipped as data files, so the items can
never drift from the suite that `moetrim eval` draws, and no relative data path has to be resolved.
"""

from __future__ import annotations

from typing import Any


def records(domain: str, n: int | None = None) -> list[dict[str, str]]:
    """The eval items `moetrim eval --tasks DOMAIN` scores, in its order: prompt, answer, completion."""
    from moetrim.data.tasks import get_items

    return [{"prompt": it.prompt, "answer": it.answer, "completion": it.completion}
            for it in get_items(domain, "eval", n)]


def load(domain: str, **_: Any):
    """lm-eval `custom_dataset` hook (called with the task's metadata and dataset_kwargs)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records(domain))})
