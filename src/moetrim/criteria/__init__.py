"""Importance criteria: small functions of a profile and the model's weights, registered by name.

Expert criteria return a score per expert [E]; dimension criteria a score per intermediate
dimension [E, I]. Higher means more important (kept first). Every score is float64 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moetrim.calibrate.profile import Profile
from moetrim.errors import UsageError
from moetrim.model.view import MoELayer


@dataclass(frozen=True)
class Criterion:
    name: str
    level: str  # "expert" or "dim"
    fn: Callable[..., torch.Tensor]
    comparable_across_layers: bool  # False: normalise per layer before a global ranking
    needs_gradients: bool = False
    doc: str = ""
    needs_weights: bool = False  # reads the experts' weights (a streaming plan loads them one layer at a time)
    needs_profile: bool = True  # False: weights (or a seed) only, no calibration data (random, magnitude, aimer)
    allocation: str | None = None  # the authors' allocation where it is part of the method (camera: layer)
    min_width: int | None = None  # the authors' floor on an expert's width (camera: 0)


REGISTRY: dict[tuple[str, str], Criterion] = {}  # (level, name)


def register(name: str, level: str, *, comparable: bool, gradients: bool = False, doc: str = "", weights: bool = False,
             profile: bool = True, allocation: str | None = None, min_width: int | None = None):
    def deco(fn):
        REGISTRY[(level, name)] = Criterion(name, level, fn, comparable, gradients, doc or (fn.__doc__ or "").strip().splitlines()[0],
                                            weights, profile, allocation, min_width)
        return fn

    return deco


def names(level: str) -> list[str]:
    return [name for (lvl, name) in REGISTRY if lvl == level]


def get_criterion(name: str, level: str) -> Criterion:
    crit = REGISTRY.get((level, name))
    if crit is None:
        raise UsageError(f"unknown {level} criterion '{name}'; choose from {', '.join(names(level))}")
    return crit


from moetrim.criteria import dims as _dims  # noqa: E402,F401  (registers)
from moetrim.criteria import experts as _experts  # noqa: E402,F401
from moetrim.criteria.experts import unified_score  # noqa: E402

__all__ = ["Criterion", "REGISTRY", "get_criterion", "names", "unified_score"]


def score(name: str, level: str, profile: Profile | None, layer: MoELayer, *, seed: int = 0, **kw) -> torch.Tensor:
    """Score one layer with a named criterion (the profile may be None for weight-only criteria)."""
    crit = get_criterion(name, level)
    return crit.fn(profile, layer, seed=seed, **kw).double().cpu()
