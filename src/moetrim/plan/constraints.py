"""What a plan promises, checked after planning: the ratio within its stated tolerance, protected
dims kept, widths at least `min_width` and multiples of `round_to`. A plan that misses any of them is
refused with the constraint that made the target unreachable, found by planning again without it.
"""

from __future__ import annotations

from typing import Callable

import torch

from moetrim.errors import UsageError
from moetrim.model.view import MoELayer
from moetrim.plan.schema import Plan

# The removed fraction may differ from --ratio by this much where widths and counts are fine-grained.
BASE_TOLERANCE = 0.02


def ratio_tolerance(layers: list[MoELayer], granularity: str, allocation: str, round_to: int) -> float:
    """How far the removed fraction may be from the ratio: 2 points, or half of the smallest step
    the plan can take where steps are coarser: one expert of a small layer, or one rounding step of
    the pool whose widths are rounded together (an expert for uniform, a layer, the whole model)."""
    if granularity == "experts":
        if allocation == "global":
            step = 1 / sum(l.num_experts for l in layers)
        else:
            step = max(l.num_groups / l.num_experts for l in layers)
    else:
        width = layers[0].widths[0]
        pools = {"uniform": [width], "layer": [l.num_experts * width for l in layers],
                 "global": [sum(l.num_experts for l in layers) * width],
                 "layer_width": [len(layers) * width]}[allocation]  # one width per layer, rounded across layers
        step = round_to / min(pools) if round_to > 1 else 0.0
    return round(max(BASE_TOLERANCE, step / 2), 6)


def _violations(plan: Plan, protected: list[torch.Tensor] | None) -> list[str]:
    """Which promises the plan breaks (empty when it meets them all)."""
    found = []
    if abs(plan.removed_fraction - plan.ratio) > plan.ratio_tolerance + 1e-9:
        found.append("ratio")
    if protected is not None:
        for lp, mask in zip(plan.layers, protected):
            kept = torch.zeros_like(mask)
            for e, dims in zip(lp.kept_experts, lp.kept_dims or [list(range(lp.width_before))] * len(lp.kept_experts)):
                kept[e, dims] = True
            if bool((mask & ~kept).any()):
                found.append("protect")
                break
    if plan.granularity == "dims":
        widths = [(w, lp.width_before) for lp in plan.layers for w in lp.widths]
        if plan.min_width and any(w < min(plan.min_width, full) for w, full in widths):
            found.append("min_width")
        if any(w % plan.round_to and w != full for w, full in widths):
            found.append("round_to")
    return found


_OPTION = {"min_width": "--min-width", "round_to": "--round-to", "protect": "--protect"}
_NEUTRAL = {"min_width": 0, "round_to": 1, "protect": None}


def check_constraints(plan: Plan, layers: list[MoELayer], protected: list[torch.Tensor] | None, replan: Callable[..., Plan]) -> None:
    """Raise a UsageError naming the constraint that stops `plan` from meeting what was asked.

    replan(**changes) plans again with some arguments changed (ratio, min_width, round_to,
    protected); it is called only when the plan misses, to find the culprit and the reachable range."""
    broken = _violations(plan, protected)
    if not broken:
        return
    active = {"min_width": plan.min_width, "round_to": plan.round_to if plan.round_to > 1 else None,
              "protect": plan.protect or None} if plan.granularity == "dims" else {}
    culprits = []
    for name, value in active.items():
        if value is None:
            continue
        trial = replan(**{name if name != "protect" else "protected": _NEUTRAL[name]})
        if not _violations(trial, None if name == "protect" else protected):
            culprits.append(f"{_OPTION[name]} {value}")
    asked = f"{plan.ratio:.1%} (±{plan.ratio_tolerance:.1%})"
    got = f"the plan would remove {plan.removed_fraction:.1%}"
    if "protect" in broken and "ratio" not in broken:
        lost = f"--protect {plan.protect} cannot be honoured with --allocation {plan.allocation} at --ratio {plan.ratio:g}: " \
               "some protected dims would be removed"
        raise UsageError(f"{lost}; lower --protect or --ratio, or use --allocation global")
    if "ratio" not in broken:
        names = " and ".join(_OPTION[b] for b in broken)
        raise UsageError(f"the plan cannot meet {names} at --ratio {plan.ratio:g} with --allocation {plan.allocation}; "
                         f"{got}; change {names} or --ratio")
    reach = f", and at most {replan(ratio=_MAX_RATIO).removed_fraction:.1%} can go" if plan.removed_fraction < plan.ratio else ""
    if culprits:
        why = " with " + " and ".join(culprits)
        fix = f"lower {' or '.join(c.split()[0] for c in culprits)} or change --ratio"
    elif plan.granularity == "experts":
        why = " by removing whole experts (every layer keeps at least one; grouped routers keep groups equal)"
        fix = "use another --ratio or --allocation"
    else:
        why = " with these constraints together (" + ", ".join(f"{_OPTION[k]} {v}" for k, v in active.items() if v is not None) + ")"
        fix = "relax them or change --ratio"
    raise UsageError(f"cannot remove {asked} of routed-expert parameters{why}: {got}{reach}; {fix}")


_MAX_RATIO = 0.999999
