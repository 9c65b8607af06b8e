"""Apply: a plan becomes real modules (the stage `moetrim apply` runs). Slicing (dims and experts
plans) cuts the experts' tensors and routers to smaller ones, in memory or streamed from the files
one decoder layer at a time; replacing (replace, naive, merge and d2 plans) builds shared bases and
low-rank corrections. It reads plans (moetrim.plan), installs the runtime modules of moetrim.model,
and writes through moetrim.checkpoint when streaming.

slicing    dims and experts plans, in memory
streaming  the same slicing from the checkpoint on disk (apply_streaming)
replace    build_replaced, apply_replace_plan: replaced experts from a ReplacePlan
"""

from moetrim.apply.slicing import ApplyResult
from moetrim.apply.slicing import apply_plan as apply_sliced_plan

__all__ = ["ApplyResult", "apply_plan", "apply_sliced_plan"]


def apply_plan(model, plan, profile=None, **options) -> ApplyResult:
    """Apply any plan in place, so that `make_plan` + `apply_plan` serve every granularity: a dims or
    experts `Plan` slices tensors (options: check_fingerprint, force_varwidth), and an auto plan also builds
    its replaced layers (novices, merged or replaced groups; save writes varwidth or replaced); a `ReplacePlan`
    (replace, naive, merge, d2) builds replaced experts from the model's own weights, and needs the
    profile when the plan whitens its corrections. The result names the checkpoint format
    save writes: standard, varwidth or replaced.

    >>> plan = moetrim.make_plan(model, profile, granularity="merge", ratio=0.25)
    >>> moetrim.apply_plan(model, plan, profile).format
    'replaced'
    """
    from moetrim.plan.replace import ReplacePlan

    if isinstance(plan, ReplacePlan):
        from moetrim.apply.replace import apply_replace_plan

        if options:
            raise TypeError(f"apply_plan with a {plan.granularity} plan takes no {', '.join(options)}")
        apply_replace_plan(model, plan, profile)
        return ApplyResult(plan.checkpoint_format)
    return apply_sliced_plan(model, plan, profile=profile, **options)
