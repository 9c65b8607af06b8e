"""Data, the first stage: the task suite moetrim trains, calibrates and evaluates on (a module per
domain: dates, people, skills, units, ... gathered by `tasks`), and text files read into
calibration sequences and fine-tuning records (`text`). Nothing here knows a model."""

from moetrim.data.tasks import (
    DOMAINS,
    NEW_DOMAINS,
    TASK_DOMAINS,
    TaskItem,
    calibration_texts,
    get_items,
    parse_domains,
    to_sft_records,
)

__all__ = ["DOMAINS", "NEW_DOMAINS", "TASK_DOMAINS", "TaskItem", "calibration_texts", "get_items", "parse_domains", "to_sft_records"]
