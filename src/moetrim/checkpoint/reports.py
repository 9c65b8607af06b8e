"""Reports moetrim writes (`eval --json`, `routing --json`, `routing --png`), marked as its own.

A JSON report holds `"moetrim_report": COMMAND` at its top, and a PNG report the same key in a PNG
text chunk, so that `--overwrite` can tell a report moetrim wrote from any other JSON or PNG file
(another model's config.json, a figure of yours) and replace only the former (outputs.check_output).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moetrim.checkpoint.atomic import write_text

REPORT_KEY = "moetrim_report"


def report_json(command: str, data: dict[str, Any]) -> str:
    """The report's JSON text: the marker first, then `data`."""
    return json.dumps({REPORT_KEY: command, **data}, indent=2, default=float) + "\n"


def write_report(path: str | os.PathLike, command: str, data: dict[str, Any]) -> Path:
    """Write a JSON report atomically."""
    return write_text(path, report_json(command, data))


def png_metadata(command: str) -> dict[str, str]:
    """PNG text chunks for matplotlib's `savefig(metadata=...)`: the marker, and no version string
    (the same figure gives the same bytes whichever matplotlib drew it)."""
    return {REPORT_KEY: command, "Software": "moetrim"}


def is_report_json(path: Path) -> bool:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get(REPORT_KEY), str)


def is_report_png(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.format == "PNG" and REPORT_KEY in getattr(image, "text", {})
    except Exception:  # not an image, a damaged one, or no Pillow: not a report moetrim can vouch for
        return False
