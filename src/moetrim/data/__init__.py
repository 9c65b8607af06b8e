"""Task suite (training, calibration and evaluation data) for moetrim."""

from moetrim.data.tasks import DOMAINS, TaskItem, calibration_texts, get_items, parse_domains

__all__ = ["DOMAINS", "TaskItem", "calibration_texts", "get_items", "parse_domains"]
