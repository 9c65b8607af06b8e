"""The range of every numeric option of every command, checked before any work.

One table, by option name, so that `--lr nan`, `--epochs inf`, `--seed -1` or `--n 1000000000`
end in one line and exit 2 whichever command they are given to, before a model loads. `handled`
(moetrim.cli.common) applies it to each command's arguments; a test checks that every int and float option
of the app has a row here. typer's own `min=`/`max=` would not do: its float accepts nan and inf.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

from moetrim.errors import UsageError

MAX_TASK_ITEMS = 100_000  # --n of `tasks` and `eval`, --eval-items: the task generators draw distinct items one by one


@dataclass(frozen=True)
class Range:
    """low <= x <= high (either end open when asked, or absent)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            if not self.low_open and not self.high_open and float(self.low).is_integer() and float(self.high).is_integer():
                return f"between {self.low:,} and {self.high:,}"
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"> {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)


def at_least(n: int) -> Range:
    return Range(n)


RANGES: dict[str, Range] = {
    # data and batches
    "--seed": Range(0, 2**32 - 1),  # numpy and the Trainer seed with 32 bits
    "--batch-size": at_least(1),
    "--seq-len": at_least(2),
    "--max-tokens": at_least(2),
    "--n": Range(1, MAX_TASK_ITEMS),
    "--eval-items": Range(1, MAX_TASK_ITEMS),
    # plans
    "--ratio": Range(0, 1, high_open=True),
    "--min-width": NON_NEGATIVE,
    "--round-to": at_least(1),
    "--protect": NON_NEGATIVE,
    "--rank": at_least(1),
    "--max-group": at_least(2),  # a group of one stores a base and corrections for a single expert: more, not less
    # training
    "--lr": POSITIVE,
    "--recover-lr": POSITIVE,
    "--recover-steps": NON_NEGATIVE,
    "--epochs": POSITIVE,
    "--max-steps": NON_NEGATIVE,
    "--steps": at_least(1),
    "--grad-accum": at_least(1),
    "--warmup": NON_NEGATIVE,
    "--min-lr-ratio": FRACTION,
    "--weight-decay": NON_NEGATIVE,
    "--lora": NON_NEGATIVE,
    "--aux-coef": NON_NEGATIVE,
    "--gamma": NON_NEGATIVE,
    "--gamma-phase2": NON_NEGATIVE,
    "--condensers": NON_NEGATIVE,
    "--phase1": Range(0, 1, low_open=True, high_open=True),
    "--esft-threshold": Range(0, 1, low_open=True),
    "--checkpoint-every": NON_NEGATIVE,
    "--routing-tokens": NON_NEGATIVE,
    "--blend-fraction": Range(0, 1, low_open=True),
    "--kd-weight": NON_NEGATIVE,
}


def option_names(fn: Callable) -> dict[str, str]:
    """{parameter name: its option (--lr)} of a typer command function, read from its declarations."""
    import typer.models

    names = {}
    for name, p in inspect.signature(fn).parameters.items():
        info = p.default
        if isinstance(info, typer.models.OptionInfo) and info.param_decls:
            names[name] = next((d for d in info.param_decls if d.startswith("--")), info.param_decls[0])
    return names


def check_numbers(values: dict[str, object], names: dict[str, str]) -> None:
    """Every int and float argument finite and in its option's range; one UsageError line otherwise."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or name not in names:
            continue
        flag = names[name]
        bounds = RANGES.get(flag)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number{f' ({bounds})' if bounds else ''}, got {value}")
        if bounds is not None and not bounds.holds(value):
            raise UsageError(f"{flag} must be {bounds}, got {value:g}" if isinstance(value, float) else f"{flag} must be {bounds}, got {value}")
