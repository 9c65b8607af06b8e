"""Plans: which experts and which intermediate dimensions stay, per MoE layer, as reviewable JSON.

schema       the Plan dataclasses, canonical JSON, strict reading of hand-edited files
allocate     make_plan: scores -> widths and kept experts under global, layer or uniform allocation
constraints  the promises a plan keeps (ratio within tolerance, protect, min-width, round-to)
"""

from moetrim.plan.allocate import make_plan
from moetrim.plan.constraints import ratio_tolerance
from moetrim.plan.schema import ALLOCATIONS, GRANULARITIES, SCHEMA_VERSION, LayerPlan, Plan, load_plan

__all__ = ["ALLOCATIONS", "GRANULARITIES", "SCHEMA_VERSION", "LayerPlan", "Plan", "load_plan", "make_plan", "ratio_tolerance"]
