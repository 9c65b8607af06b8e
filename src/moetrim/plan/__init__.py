"""Plans: which experts and which intermediate dimensions stay, or which experts become shared bases
plus low-rank corrections, per MoE layer, as reviewable JSON. The stage between calibration
(a Profile scored by moetrim.criteria) and building (moetrim.apply turns a plan into modules).

schema       the Plan dataclasses, canonical JSON, strict reading of hand-edited files
allocate     dims and experts plans: scores -> widths and kept experts under global, layer or uniform allocation
constraints  the promises a plan keeps (ratio within tolerance, protect, min-width, round-to)
replace      replace, naive, merge and d2 plans: kept experts, groups, ranks, priced in stored parameters
cluster      grouping experts by their mean outputs (replace, merge)
"""

from moetrim.plan.allocate import make_plan as make_slicing_plan
from moetrim.plan.constraints import ratio_tolerance
from moetrim.plan.replace import ReplacePlan, make_replace_plan
from moetrim.plan.schema import ALLOCATIONS, GRANULARITIES, REPLACE_METHODS, SCHEMA_VERSION, LayerPlan, Plan, load_plan

__all__ = ["ALLOCATIONS", "GRANULARITIES", "REPLACE_METHODS", "SCHEMA_VERSION", "LayerPlan", "Plan", "ReplacePlan", "load_plan",
           "make_plan", "make_replace_plan", "make_slicing_plan", "ratio_tolerance"]


def make_plan(model, profile, *, granularity: str = "dims", **options):
    """Plan any granularity, so that `make_plan` + `apply_plan` serve every method: dims and experts
    give a `Plan` (options: criterion, ratio, allocation, min_width, round_to, protect, seed,
    exponents, layer_weights; see make_slicing_plan); replace, naive, merge and d2 give a
    `ReplacePlan` (options: ratio, rank, criterion, max_group, base_weighting, whiten, seed; see
    make_replace_plan). Same inputs and seed, same plan.

    >>> plan = moetrim.make_plan(model, profile, granularity="replace", ratio=0.25, rank=8)
    >>> plan.granularity, plan.removed_fraction >= 0.25
    ('replace', True)
    """
    if options.get("criterion") is None:
        options.pop("criterion", None)  # each builder's own default: fisher (dims), reap (replace methods)
    if granularity in REPLACE_METHODS:
        return make_replace_plan(model, profile, method=granularity, **options)
    return make_slicing_plan(model, profile, granularity=granularity, **options)
