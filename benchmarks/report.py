"""Benchmarks write their Markdown tables into sections of benchmarks/README.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def update_section(name: str, text: str, readme: Path = README) -> None:
    """Replace the text between <!-- name:start --> and <!-- name:end --> (appended if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = readme.read_text() if readme.exists() else "# Benchmarks\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in body and end in body:
        head, rest = body.split(start, 1)
        body = head + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(readme, body)


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so an interrupted run leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))
