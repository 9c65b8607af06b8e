"""`--method auto`: per MoE layer, the method and amount that cost least, measured on calibration data.

Why: which method keeps most differs by model and by layer (fine-grained layers lose whole experts
gracefully where coarse ones do not), and no paper says which to use where. So auto measures instead of
guessing, on the calibration split only (never eval):

1. Candidates. Each candidate method (trimming dimensions by Fisher or CAMERA-P's energy, removing whole
   experts by REAP, turning experts into MoNE novices, merging them HC-SMoE's way, replacing them by
   shared bases plus rank-16 corrections) is planned at every ratio of `RATIO_GRID` with the same ratio
   in every layer (replacing, whose plan ranks experts globally, only with its own plans near the ratio).
2. Cost. Each candidate layer is swapped alone into the dense model, and its cost is the KL of the
   final next-token distributions to the dense model's on the calibration tokens (at most `MAX_TOKENS`).
3. Allocation. One option per layer (a method and a ratio, or nothing) minimising the summed cost while
   removing at least `ratio` of the routed-expert parameters: a multiple-choice knapsack, solved exactly
   by dynamic programming over the removed parameters in steps of 1/2000 of the total.
4. Guard. Summed one-layer KLs ignore how errors compound, so the allocated plan is compared, by the
   KL of the final next-token distributions to the dense model's on the calibration tokens (at most
   `GUARD_TOKENS`), with each candidate method applied alone at the ratio (its own default
   allocation); the lowest KL wins. By
   construction auto is never worse than the best single candidate on that calibration criterion.

The plan is a slicing plan (granularity "auto": a layer may lose dimensions or whole experts) whose
`replaced_layers` hold the layers that became novices, merged or replaced groups (their slicing row keeps
every expert whole); applying it builds those from the dense layers and slices the rest, and the checkpoint
carries both layer records (moetrim.apply.slicing). Where the guard picks a candidate alone, the plan is
that candidate's own (a ReplacePlan for the replace methods). Its notes record every layer's choice with its
measured cost, and every guard KL, so a reviewer sees what was chosen and why. Training (LightMoE's
recovery, Router KD) is not part of the choice: every option is measured as built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moetrim.errors import UsageError
from moetrim.model.view import find_moe_layers
from moetrim.plan.schema import REPLACE_METHODS

CANDIDATES: tuple[tuple[str, str | None], ...] = (
    ("dims", "fisher"), ("dims", "camera"), ("experts", "reap"), ("novice", "mone"), ("merge", None), ("replace", "reap"))
GLOBAL_ONLY = ("replace",)  # planned only at the ratios near the target (a global ranking; no per-layer ratio)
REPLACE_RANK = 16  # the replace candidate's correction rank (the CLI's default)
RATIO_GRID = tuple(i / 16 for i in range(1, 16))  # per-layer ratios, in steps of 1/16
NEAR_OFFSETS = (-0.1, -0.05, 0.0, 0.05, 0.1)  # each candidate's own (global) plan around the asked ratio
MAX_TOKENS = 4096  # calibration tokens each option's KL is measured on: enough to rank options, bounded cost on large models
GUARD_TOKENS = 16 * MAX_TOKENS  # calibration tokens of the guard's KL (a bound on its cost; all of the bundled benchmarks' data)
STEPS = 2000  # knapsack resolution: removed parameters in steps of 1/STEPS of the total


@dataclass(frozen=True)
class Option:
    method: str  # "granularity:criterion", or "keep"
    ratio: float
    removed: int  # routed-expert parameters this layer loses
    cost: float  # relative output error on the calibration inputs
    layer_plan: object | None = None


def _capped(batches: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    out, n = [], 0
    for b in batches:
        if n >= tokens:
            break
        out.append(b)
        n += b.numel()
    return out


@torch.no_grad()
def layer_options(model: nn.Module, profile, batches: list[torch.Tensor], candidates=CANDIDATES, grid=RATIO_GRID,
                  seed: int = 0, near: float | None = None) -> dict[int, list[Option]]:
    """Every layer's options: nothing removed, or each candidate at each ratio, with its measured cost: the KL
    of the final next-token distributions when only that layer is compressed (the dense model with the
    compressed layer's block swapped in by a forward hook), on at most MAX_TOKENS calibration tokens. With
    `near`, each candidate is also planned with its own default allocation (global for dims) at ratios around
    it, so the per-layer widths a global ranking gives are options too."""
    from moetrim.apply import apply_plan
    from moetrim.apply.slicing import shared_copy

    batches = _capped(batches, MAX_TOKENS)
    dense_logp = [_logp(model, b) for b in batches]
    layers = find_moe_layers(model)
    options = {l.index: [Option("keep", 0.0, 0, 0.0)] for l in layers}
    candidates = usable_candidates(profile, layers, candidates)
    trials = [(g, c, r, "layer") for g, c in candidates if g not in GLOBAL_ONLY for r in grid]
    if near is not None:
        trials += [(g, c, round(near + d, 6), None) for g, c in candidates for d in NEAR_OFFSETS if 0 < near + d < 1]
    for granularity, criterion, ratio, allocation in trials:
        replacing = granularity in REPLACE_METHODS
        m = shared_copy(model)
        try:
            plan = _plan(m, profile, granularity, criterion, ratio, allocation, seed)
        except UsageError:  # this ratio is unreachable for this method here (too few experts ...)
            continue
        apply_plan(m, plan, profile)
        by_index = {lp.layer: lp for lp in plan.layers}
        for orig, new in zip(layers, find_moe_layers(m)):
            removed = orig.routed_params() - new.routed_params()
            if replacing and removed <= 0:
                continue  # this layer is not replaced at this ratio (or stores more than it had)
            if (allocation is None or replacing) and any(o.removed == removed and o.layer_plan == by_index[orig.index] for o in options[orig.index]):
                continue  # the same layer row as an option already measured
            hook = orig.block.register_forward_hook(lambda mod, args, out, block=new.block: block(*args))
            try:
                cost = _kl(dense_logp, model, batches)
            finally:
                hook.remove()
            name = f"{granularity}:{criterion or plan.criterion}"
            if allocation is None and (not replacing or granularity in GLOBAL_ONLY):  # novice and merge plans are per layer anyway
                name += f" ({plan.allocation} plan at {ratio:g})"
            options[orig.index].append(Option(name, removed / orig.routed_params(), removed, cost, by_index[orig.index]))
        del m
    return options


def usable_candidates(profile, layers, candidates=CANDIDATES) -> tuple[tuple[str, str | None], ...]:
    """The candidates this profile can plan: merge clusters experts by their outputs on the same tokens, which
    only a profile calibrated with dense outputs (calibrate --dense-outputs) holds."""
    from moetrim.plan.replace import profile_has

    dense = profile is not None and profile_has(profile, layers, "dense_out_sum")
    return tuple((g, c) for g, c in candidates if g != "merge" or dense)


def _plan(model: nn.Module, profile, granularity: str, criterion: str | None, ratio: float, allocation: str | None, seed: int):
    """One candidate's plan: a slicing Plan (dims, experts) or a ReplacePlan (novice, merge, replace: planned
    per layer or globally by their own rule, so `allocation` is not theirs)."""
    from moetrim.plan import make_plan

    if granularity in REPLACE_METHODS:  # the rank is read by replace only (novices and merges store no corrections)
        return make_plan(model, profile, granularity=granularity, criterion=criterion, ratio=ratio, rank=REPLACE_RANK, seed=seed)
    return make_plan(model, profile, granularity=granularity, criterion=criterion, ratio=ratio, allocation=allocation, seed=seed)


def _logp(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)


def _kl(dense: list[torch.Tensor] | nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean KL(dense ‖ model) of the next-token distributions over the batches' tokens. `dense`: the dense
    model's log-probabilities per batch, or the dense model itself (recomputed batch by batch, so that no
    more than one batch's [B, T, vocab] is held: at a 152k vocabulary a few thousand tokens take GBs)."""
    total, n = 0.0, 0
    for i, b in enumerate(batches):
        p = _logp(dense, b) if isinstance(dense, nn.Module) else dense[i]
        q = _logp(model, b)
        total += float((p.exp() * (p - q)).sum())
        n += p.shape[0] * p.shape[1]
    return total / max(n, 1)


def allocate(options: dict[int, list[Option]], target: int, total: int) -> dict[int, Option]:
    """One option per layer, removing at least `target` parameters at the least summed cost (exact DP over
    removed parameters in steps of total / STEPS, each option's removal rounded down so the target holds)."""
    unit = total / STEPS
    need = math.ceil(target / unit - 1e-9)
    best: dict[int, tuple[float, tuple[Option, ...]]] = {0: (0.0, ())}
    for index in sorted(options):
        nxt: dict[int, tuple[float, tuple[Option, ...]]] = {}
        for have, (cost, picked) in best.items():
            for opt in options[index]:
                units = min(need, have + int(opt.removed // unit))
                cand = (cost + opt.cost, picked + (opt,))
                if units not in nxt or cand[0] < nxt[units][0]:
                    nxt[units] = cand
        best = nxt
    if need not in best:
        raise UsageError(f"--ratio {target / total:.3f} is unreachable by any mix of {', '.join(sorted({o.method for v in options.values() for o in v} - {'keep'}))}; lower --ratio")
    return dict(zip(sorted(options), best[need][1]))


@torch.no_grad()
def make_auto_plan(model: nn.Module, profile, batches: list[torch.Tensor], *, ratio: float, seed: int = 0,
                   candidates=CANDIDATES, grid=RATIO_GRID, progress: bool = False):
    """The auto plan for `model` at `ratio` (see the module docstring): per-layer choices by measured layer
    error, guarded by the final-logit KL against each candidate alone. `batches`: calibration token batches."""
    from moetrim.apply import apply_plan
    from moetrim.apply.slicing import shared_copy
    from moetrim.model.identity import model_fingerprint
    from moetrim.plan.allocate import check_method
    from moetrim.plan.constraints import ratio_tolerance
    from moetrim.plan.replace import ReplaceLayer, stored_params
    from moetrim.plan.schema import LayerPlan, Plan
    from moetrim.progress import status

    check_method("dims", None, ratio, None)  # the ratio's own checks
    for granularity, criterion in candidates:
        if granularity not in REPLACE_METHODS:
            check_method(granularity, criterion, ratio, None)
    layers = find_moe_layers(model)
    total = sum(l.routed_params() for l in layers)
    with status("auto: measuring every method at every ratio, layer by layer", progress):
        options = layer_options(model, profile, batches, candidates, grid, seed, near=ratio)
    chosen = allocate(options, math.ceil(ratio * total - 1e-9), total)
    plan_layers, replaced = [], []
    for l in layers:
        picked = chosen[l.index].layer_plan
        if picked is None or isinstance(picked, ReplaceLayer):
            plan_layers.append(LayerPlan(l.index, l.num_experts, l.widths[0], l.top_k, list(range(l.num_experts)),
                                         [l.widths[0]] * l.num_experts, None))
            if picked is not None:
                replaced.append(picked)
        else:
            plan_layers.append(picked)
    by_index = {r.layer: r for r in replaced}
    after = sum(stored_params(l, by_index[l.index]) if l.index in by_index else l.params_at(lp.widths)
                for l, lp in zip(layers, plan_layers))
    notes = [f"layer {l.index}: {chosen[l.index].method} at {chosen[l.index].ratio:.3f} (final-logit KL with only "
             f"this layer compressed {chosen[l.index].cost:.4g}; the cheapest others removing as much: "
             + ", ".join(f"{o.method}@{o.ratio:.3g} {o.cost:.3g}" for o in sorted(options[l.index], key=lambda o: o.cost)
                         if o is not chosen[l.index] and o.removed >= chosen[l.index].removed)[:3 * 40] + ")"
             for l in layers]
    auto = Plan("auto", "auto", float(ratio), "layer", int(seed), None, 1, 0, None, model_fingerprint(model),
                profile.digest() if profile is not None else None, int(total), int(after), plan_layers, notes=notes,
                ratio_tolerance=ratio_tolerance(layers, "experts", "layer", 1), replaced_layers=replaced or None)
    auto.ratio_tolerance = max(auto.ratio_tolerance, round(abs(auto.removed_fraction - ratio), 6) + 1e-6)
    # the guard: the allocated plan against each candidate alone, by the final-logit KL on the calibration tokens
    contenders = {"auto (per-layer allocation)": auto}
    batches = _capped(batches, GUARD_TOKENS)
    for granularity, criterion in usable_candidates(profile, layers, candidates):
        try:
            alone = _plan(model, profile, granularity, criterion, ratio, None, seed)
        except UsageError:
            continue
        contenders[f"{granularity}:{criterion or alone.criterion} alone"] = alone
    kls = {}
    with status("auto: comparing the allocation with each method alone (final-logit KL)", progress):
        for name, plan in contenders.items():
            m = shared_copy(model)
            apply_plan(m, plan, profile)
            kls[name] = _kl(model, m, batches)
            del m
    winner = min(kls, key=lambda k: (kls[k], k != "auto (per-layer allocation)"))
    plan = contenders[winner]
    plan.notes = [*plan.notes] if plan is auto else [*auto.notes, *plan.notes]
    plan.notes.append("auto: final-logit KL to the dense model on the calibration tokens: "
                      + ", ".join(f"{k} {v:.4g}" for k, v in sorted(kls.items(), key=lambda kv: kv[1])) + f"; chosen: {winner}")
    return plan
