"""Task suite (training, calibration and evaluation data) for moetrim."""

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
