"""`moetrim.compress`: calibrate -> plan -> build in one call, for every method `moetrim compress` has.

The CLI command loads, checks its outputs, calls this and saves; a Python user gets the same model,
plan and profile without the files in between. Methods (the CLI's --granularity):

- dims, experts: trim intermediate dimensions or remove whole experts (moetrim.plan.allocate,
  moetrim.apply.slicing); auto: per layer, whichever of those, novices, merging or replacing costs least
  (moetrim.plan.auto);
- replace, naive, merge, d2: experts become shared bases plus low-rank corrections
  (moetrim.plan.replace, moetrim.apply.replace), optionally recovered by training what was built
  (moetrim.train.recovery).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from moetrim.apply import apply_plan
from moetrim.calibrate import Profile, calibrate
from moetrim.errors import UsageError
from moetrim.plan.schema import GRANULARITIES, REPLACE_METHODS
from moetrim.progress import status

METHODS = (*GRANULARITIES, *REPLACE_METHODS, "auto")


@dataclass
class CompressResult:
    """What `compress` made: the compressed model (the one given, changed in place, or the recovered
    one), its plan (a Plan, or a ReplacePlan for replace/naive/merge/d2), the calibration profile,
    and a report: method, checkpoint format, a note, parameters before and after, and recovery."""

    model: nn.Module
    plan: Any
    profile: Profile | None  # None: a weight-only criterion, planned without data
    report: dict[str, Any] = field(default_factory=dict)


def check_method(method: str, criterion: str | None, ratio: float, allocation: str | None = None) -> str | None:
    """The method's choices on their own, before any work; returns the criterion with the method's
    default filled in (fisher for dims, reap for experts; None for replace methods: reap when planned)."""
    from moetrim import criteria
    from moetrim.plan.allocate import check_method as check_granularity

    if method not in METHODS:
        raise UsageError(f"unknown granularity '{method}' (--granularity); choose from {', '.join(METHODS)}")
    if method == "auto":
        if criterion is not None or allocation is not None:
            raise UsageError("--method auto chooses the criteria and the allocation per layer itself: drop --criterion/--allocation")
        check_granularity("dims", None, ratio, None)
        return None
    if method in REPLACE_METHODS:
        if criterion is not None:
            criteria.get_criterion(criterion, "expert")
        return criterion
    return check_granularity(method, criterion, ratio, allocation).name


def statistics_needed(method: str, criterion: str | None, *, base_weighting: str | None = None, whiten: bool = False,
                      grad_checkpoint: bool = False) -> dict[str, bool]:
    """The `calibrate` switches a method needs: gradients only for criteria (or base weightings) that
    read them, input Grams for whitening, every expert on every token for merge's clustering."""
    from moetrim import criteria

    if method == "auto":  # its candidates include Fisher dimension trimming and HC-SMoE merging (outputs on the same tokens)
        return {"fisher": True, "dense_outputs": True, "grad_checkpoint": grad_checkpoint}
    if method in REPLACE_METHODS:
        fisher = base_weighting in ("fisher", "fisher_usage") or method == "d2"
        return {"fisher": fisher, "whiten": whiten, "dense_outputs": method == "merge", "grad_checkpoint": grad_checkpoint and fisher}
    crit = criteria.get_criterion(criterion, "dim" if method == "dims" else "expert")
    return {"fisher": crit.needs_gradients, "grad_magnitude": criterion == "grad_magnitude",
            "grad_checkpoint": grad_checkpoint and crit.needs_gradients}


def compress(
    model: nn.Module,
    data,
    method: str = "dims",
    ratio: float = 0.5,
    tokenizer=None,
    *,
    profile: Profile | None = None,
    criterion: str | None = None,
    allocation: str | None = None,
    min_width: int | None = None,
    round_to: int | None = None,
    protect: int = 0,
    exponents: Sequence[float] | None = None,
    rank: int = 16,
    max_group: int = 8,
    base_weighting: str | None = None,
    whiten: bool = False,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 4,
    fisher_mode: str = "sequence",
    grad_checkpoint: bool = False,
    seed: int = 0,
    recover_steps: int = 0,
    recover_data=None,
    recover_lr: float = 1e-4,
    teacher: nn.Module | Callable[[], nn.Module] | None = None,
    progress: bool = False,
) -> CompressResult:
    """Compress `model` in place with one method: calibrate on `data`, plan, build. The same inputs
    and seed give what `moetrim compress` saves, tensor for tensor.

    data: a .txt/.jsonl path (comma-separated for several), a list of strings, or input_ids tensors
    (what `moetrim.calibrate` reads; text needs `tokenizer`); None for a weight-only criterion (aimer,
    magnitude, random), which plans from the weights alone. profile: a profile already recorded
    (calibration is then skipped). The options are the CLI's: criterion, allocation, min_width,
    round_to, protect, exponents (dims, experts); rank, max_group, base_weighting, whiten (replace,
    naive, merge, d2); max_tokens, seq_len, batch_size, fisher_mode, grad_checkpoint (calibration).
    recover_steps > 0 (replace methods) then trains what was built, annealed from `teacher` (the
    uncompressed model, or a function that loads it; default: a copy taken before building) on
    `recover_data` (default: `data`, its first file when it names several).

    >>> model, tok = moetrim.reference_model()
    >>> result = moetrim.compress(model, "calib.txt", method="experts", ratio=0.5, tokenizer=tok)
    >>> result.plan.removed_fraction >= 0.5
    True
    >>> moetrim.save(result.model, "out", tokenizer=tok, plan=result.plan, profile=result.profile)
    """
    from moetrim.model.view import find_moe_layers

    criterion = check_method(method, criterion, ratio, allocation)
    replacing = method in REPLACE_METHODS
    if replacing:
        from moetrim.plan.replace import check_replace_options

        check_replace_options(method, ratio, rank, max_group, base_weighting, find_moe_layers(model))
        if recover_steps and method == "ream":
            raise UsageError("recover_steps trains replaced experts; a REAM model is a standard checkpoint: fine-tune it with "
                             "moetrim finetune")
    elif recover_steps:
        raise UsageError("recover_steps applies to replace, naive, merge and d2; recover a pruned or trimmed model with moetrim.recover")
    if method == "auto" and data is None:
        raise UsageError("--method auto measures every option on calibration data: give data")
    if profile is None and data is None:
        from moetrim import criteria

        if replacing or criteria.get_criterion(criterion, "dim" if method == "dims" else "expert").needs_profile:
            raise UsageError(f"{method} with criterion '{criterion}' reads calibration statistics: give data (or a profile)")
    elif profile is None:
        needs = statistics_needed(method, criterion, base_weighting=base_weighting, whiten=whiten, grad_checkpoint=grad_checkpoint)
        profile = calibrate(model, data, tokenizer=tokenizer, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                            fisher_mode=fisher_mode, progress=progress, **needs)
    if method == "auto":
        from moetrim.calibrate.run import default_seq_len, select_chunks
        from moetrim.data.text import batches
        from moetrim.plan.auto import make_auto_plan

        chunks = select_chunks(data, tokenizer, seq_len=seq_len or default_seq_len(model), max_tokens=max_tokens, seed=seed)
        plan = make_auto_plan(model, profile, batches(chunks, batch_size), ratio=ratio, seed=seed, progress=progress)
    elif replacing:
        from moetrim.plan.replace import make_replace_plan

        plan = make_replace_plan(model, profile, method=method, ratio=ratio, rank=rank, criterion=criterion,
                                 max_group=max_group, base_weighting=base_weighting, whiten=whiten, seed=seed)
    else:
        from moetrim.plan import make_plan

        plan = make_plan(model, profile, granularity=method, criterion=criterion, ratio=ratio, allocation=allocation,
                         min_width=min_width, round_to=round_to, protect=protect, seed=seed,
                         exponents=None if exponents is None else list(exponents))
    original = copy.deepcopy(model) if recover_steps and teacher is None else None
    if replacing or method == "auto":  # auto may have chosen novices, merged or replaced groups
        with status("building replaced experts" if replacing else "building the chosen layers", progress):
            built = apply_plan(model, plan, profile)
    else:
        built = apply_plan(model, plan)
    report: dict[str, Any] = {"method": method, "format": built.format, "note": built.note, "params_before": plan.params_before,
                              "params_after": plan.params_after, "removed_fraction": plan.removed_fraction}
    if recover_steps:
        model, report["recover"] = _recover(model, tokenizer, data, original if original is not None else teacher, steps=recover_steps,
                                            recover_data=recover_data, lr=recover_lr, seq_len=seq_len, seed=seed)
    return CompressResult(model, plan, profile, report)


def _recover(model: nn.Module, tokenizer, data, teacher, *, steps: int, recover_data, lr: float, seq_len: int | None, seed: int):
    """Recovery after building (compress --recover-steps): the replaced experts trained, annealed from the teacher."""
    from moetrim.calibrate.run import model_context
    from moetrim.train import FinetuneConfig, finetune

    if not isinstance(teacher, nn.Module):
        teacher = teacher()  # a loader: the teacher is read only now, after building
    if recover_data is None:
        recover_data = data.split(",")[0] if isinstance(data, str) else data
    cfg = FinetuneConfig(method="recover", lr=lr, max_steps=steps, seed=seed, seq_len=seq_len or model_context(model) or 512)
    result = finetune(model, tokenizer, recover_data, cfg, teacher=teacher)
    return result.model, {"steps": steps, "anneal": cfg.anneal, "lr": lr, "report": result.report}
