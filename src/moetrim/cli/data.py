"""`moetrim tasks`: task-suite items as a fine-tuning, calibration or routing data file."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moetrim.checkpoint.atomic import write_text
from moetrim.checkpoint.outputs import check_output
from moetrim.cli.common import OverwriteOpt, SeedOpt, handled, out
from moetrim.data.tasks import DOMAINS, SPLITS, TASK_DOMAINS, TaskItem, get_items, to_sft_records
from moetrim.errors import UsageError

TASK_FILE_SUFFIXES = (".jsonl", ".txt")


def task_file_text(items: list[TaskItem], suffix: str) -> str:
    """A .jsonl of prompt/response records, or .txt with one item's text per blank-line separated
    paragraph (what `moetrim.data.text.read_documents` reads back)."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in to_sft_records(items))
    return "\n\n".join(item.text.strip() for item in items) + "\n"


@handled
def tasks_cmd(
    domain: str = typer.Argument(..., metavar="DOMAIN", help=f"{', '.join(TASK_DOMAINS)} (the reference model never saw "
                                 f"{', '.join(d for d in TASK_DOMAINS if d not in DOMAINS)})"),
    split: str = typer.Option("train", "--split", help=", ".join(SPLITS)),
    n: int = typer.Option(2000, "--n", help="items to write"),
    seed: int = SeedOpt,
    out_path: Path = typer.Option(..., "--out", help="FILE.jsonl (prompt/response records) or FILE.txt (one item per paragraph)"),
    overwrite: bool = OverwriteOpt,
):
    """Write task-suite items as a data file for `moetrim finetune`, `calibrate` or `routing`."""
    if out_path.suffix not in TASK_FILE_SUFFIXES:
        raise UsageError(f"--out {out_path} must end in .jsonl (prompt/response records) or .txt (one item per paragraph)")
    try:
        get_items(domain, split, 0)  # checks the names before anything else
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_output(out_path, kind="task file", overwrite=overwrite)
    try:
        items = get_items(domain, split, n, seed=seed)
    except ValueError as exc:
        raise UsageError(f"{exc}; ask for fewer with --n") from None
    write_text(out_path, task_file_text(items, out_path.suffix))
    out.print(f"{len(items):,} {domain}/{split} items (seed {seed}) -> [bold]{out_path}[/]")
