"""Progress bars for long work (rich), silent when disabled or when output is not a terminal."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields advance(n). Writes to stderr so piped stdout stays clean."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=False) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n: prog.advance(task, n)


@contextlib.contextmanager
def status(label: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with `label` on stderr while the block runs (work with no count to show)."""
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(label):
        yield
