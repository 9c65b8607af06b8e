"""Planning: which experts and which intermediate dimensions stay, per MoE layer.

`--ratio` is the fraction of routed-expert parameters removed. Allocation decides where:
  global   one ranking across every layer and expert (scores not comparable across layers are
           divided by their layer's mean first), so experts end up with different widths;
  layer    the same ratio in every layer, ranked within the layer;
  uniform  one width for every expert of the model (dims), or the same count per layer (experts).
  layer_width  (dims) the global ranking decides how many dims each layer keeps, and every expert of
           a layer gets that layer's one width: layers differ, experts within a layer do not, so
           each layer runs on stock fused kernels at its own width (serving-friendly).
"""

from __future__ import annotations

import math
from typing import Callable, ContextManager

import torch
from torch import nn

from moetrim import criteria
from moetrim.calibrate.profile import Profile
from moetrim.errors import UsageError
from moetrim.model.identity import model_fingerprint
from moetrim.model.view import MoELayer, find_moe_layers, require_uniform_widths
from moetrim.plan.constraints import check_constraints, ratio_tolerance
from moetrim.plan.schema import ALLOCATIONS, GRANULARITIES, LayerPlan, Plan


# -- helpers ------------------------------------------------------------------------------
def _ranking(scores: torch.Tensor) -> torch.Tensor:
    """Indices from most to least important; ties keep index order (deterministic)."""
    return torch.sort(scores, descending=True, stable=True).indices


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    mean = scores[torch.isfinite(scores)].abs().mean() if torch.isfinite(scores).any() else torch.tensor(0.0)
    return scores / mean if mean > 0 else scores


def _round_width(width: float, round_to: int) -> int:
    return int(round(width / round_to)) * round_to


def _layer_scores(name: str, level: str, profile: Profile | None, layer: MoELayer, seed: int, exponents) -> torch.Tensor:
    kw = {}
    if exponents is not None:
        kw = {"a": exponents[0], "b": int(exponents[1]), "p": int(exponents[2])}
    return criteria.score(name, level, profile, layer, seed=seed, **kw)


def check_method(granularity: str, criterion: str | None, ratio: float, allocation: str | None) -> criteria.Criterion:
    """The method's choices on their own (the CLI calls this before loading anything); returns the
    criterion, the granularity's default (fisher for dims, reap for experts) when none is named."""
    if granularity not in GRANULARITIES:
        raise UsageError(f"unknown granularity '{granularity}' (--granularity); choose from {', '.join(GRANULARITIES)}")
    if not isinstance(ratio, (int, float)) or not (0.0 <= ratio < 1.0) or math.isnan(ratio):
        raise UsageError(f"--ratio must be in [0, 1) (the fraction of routed-expert parameters removed), got {ratio}")
    if allocation is not None and allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation '{allocation}' (--allocation); choose from {', '.join(ALLOCATIONS)}")
    level = "dim" if granularity == "dims" else "expert"
    return criteria.get_criterion(criterion or ("fisher" if granularity == "dims" else "reap"), level)


def _validate(model: nn.Module, layers: list[MoELayer], profile: Profile | None, granularity: str, criterion: str, ratio: float,
              allocation: str):
    crit = check_method(granularity, criterion, ratio, allocation)
    level = crit.level
    if crit.needs_profile and profile is None:
        raise UsageError(f"criterion '{criterion}' needs a calibration profile (--profile or --data)")
    require_uniform_widths(layers, "plan on")
    if profile is not None:
        fp = model_fingerprint(model)
        if profile.fingerprint != fp:
            raise UsageError("the profile was made from another model (model fingerprints differ); calibrate this model")
        profile.validate()
        profile.check_model(layers)
        if crit.needs_gradients and not profile.has_gradients:
            raise UsageError(f"criterion '{criterion}' needs gradients but the profile was calibrated with --no-fisher")
    return level, crit


def _validate_options(layers: list[MoELayer], granularity: str, criterion: str, profile: Profile | None, min_width: int | None,
                      round_to: int | None, protect: int, exponents: list[float] | None) -> None:
    """Options that contradict the model or each other, refused before planning."""
    width = layers[0].widths[0]
    per_layer = min(l.num_experts for l in layers) * width
    if granularity != "dims":
        for name, value in (("--min-width", min_width), ("--round-to", round_to), ("--protect", protect or None)):
            if value is not None:
                raise UsageError(f"{name} trims dimensions: it applies to --granularity dims, not experts")
    if not isinstance(protect, int) or protect < 0:
        raise UsageError("--protect must be >= 0")
    if protect and profile is None:
        raise UsageError("--protect needs a calibration profile (it reads max|h|)")
    if protect > per_layer:
        raise UsageError(f"--protect {protect} is more than the {per_layer} dims of a layer ({per_layer // width} experts x {width})")
    if min_width is not None and not 0 <= min_width <= width:
        raise UsageError(f"--min-width must be between 0 and the expert width {width}, got {min_width}")
    if round_to is not None and not 1 <= round_to <= width:
        raise UsageError(f"--round-to must be between 1 and the expert width {width}, got {round_to}")
    if exponents is not None:
        if criterion != "unified":
            raise UsageError("--exponents is only used with --criterion unified")
        if len(exponents) != 3 or not all(math.isfinite(x) for x in exponents) or exponents[1] not in (0, 1, 2) or exponents[2] not in (0, 1, 2):
            raise UsageError("--exponents takes a,b,p: a finite a, and b and p each 0, 1 or 2 (e.g. 0,1,1 for REAP)")


# -- planning -----------------------------------------------------------------------------
def make_plan(
    model: nn.Module,
    profile: Profile | None,
    *,
    granularity: str = "dims",
    criterion: str = "fisher",
    ratio: float = 0.5,
    allocation: str | None = None,
    min_width: int | None = None,
    round_to: int | None = None,
    protect: int = 0,
    seed: int = 0,
    exponents: list[float] | None = None,
    layer_weights: Callable[[MoELayer], ContextManager] | None = None,
) -> Plan:
    """Decide what to remove. Same inputs and seed give the same plan, bit for bit.

    layer_weights: for a model whose expert weights are not in memory (`moetrim.checkpoint.disk.DiskModel`),
    a context that holds one layer's weights while a weight criterion scores it.

    The plan meets every constraint asked (the ratio within `plan.ratio_tolerance`, protected dims
    kept, widths at least `min_width` and multiples of `round_to`) or a UsageError says which
    constraint makes the target unreachable."""
    if allocation is None:  # the criterion's own (camera: layer), else global for dims and layer for experts
        own = check_method(granularity, criterion, ratio, None).allocation
        allocation = own or ("global" if granularity == "dims" else "layer")
    layers = find_moe_layers(model)
    level, crit = _validate(model, layers, profile, granularity, criterion, ratio, allocation)
    _validate_options(layers, granularity, criterion, profile, min_width, round_to, protect, exponents)
    def scored(layer: MoELayer) -> torch.Tensor:
        if layer_weights is None or not crit.needs_weights:
            return _layer_scores(criterion, level, profile, layer, seed, exponents)
        with layer_weights(layer):
            return _layer_scores(criterion, level, profile, layer, seed, exponents)

    scores = [scored(l) for l in layers]
    protected = [_protected(profile.get(l.index, "act_abs_max").double(), protect) for l in layers] if protect else None

    def build(ratio: float, min_width: int | None, round_to: int | None, protected) -> Plan:
        if granularity == "experts" and allocation == "layer_width":
            raise UsageError("--allocation layer_width gives every layer one expert width: it applies to --granularity dims")
        if granularity == "experts":
            plans, rt, mw = _plan_experts(layers, scores, ratio, allocation, crit.comparable_across_layers), 1, None
        else:
            width = layers[0].widths[0]
            rt = round_to if round_to is not None else _auto_round(width, ratio, allocation)
            mw = min_width if min_width is not None else crit.min_width if crit.min_width is not None else max(1, width // 32)
            if mw % rt:
                mw = min((mw // rt + 1) * rt, width)
            plans = _plan_dims(layers, scores, ratio, allocation, crit.comparable_across_layers, mw, rt, protected)
        params_after = sum(l.params_at(p.widths) for l, p in zip(layers, plans))
        return Plan(
            granularity=granularity,
            criterion=criterion,
            ratio=float(ratio),
            allocation=allocation,
            seed=int(seed),
            min_width=mw,
            round_to=rt,
            protect=int(protect) if protected is not None else 0,
            exponents=[float(x) for x in exponents] if exponents is not None else None,
            model_fingerprint=model_fingerprint(model),
            profile_digest=profile.digest() if profile is not None else None,
            params_before=int(sum(l.routed_params() for l in layers)),
            params_after=int(params_after),
            layers=plans,
            ratio_tolerance=ratio_tolerance(layers, granularity, allocation, rt),
        )

    plan = build(ratio, min_width, round_to, protected)
    check_constraints(plan, layers, protected, lambda **kw: build(**{**dict(ratio=ratio, min_width=min_width, round_to=round_to,
                                                                            protected=protected), **kw}))
    return plan


def _auto_round(width: int, ratio: float, allocation: str) -> int:
    """Uniform widths feed transformers' grouped_mm, which needs width*bytes % 16 == 0: round to 8
    (or 4) when that stays within 2 points of the asked ratio; other allocations keep exact counts."""
    if allocation == "layer_width":
        return 8 if width % 8 == 0 and width >= 64 else 1  # grouped_mm alignment at bf16; rounded across layers
    if allocation != "uniform":
        return 1
    for step in (8, 4, 2):
        w = _round_width(width * (1 - ratio), step)
        if w > 0 and abs((1 - w / width) - ratio) <= 0.02:
            return step
    return 1


def _protected(act_max: torch.Tensor, k: int) -> torch.Tensor:
    """[E, I] mask of the k dimensions of the layer with the largest max|h|: never removed."""
    flat = act_max.flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[_ranking(flat)[: min(k, flat.numel())]] = True
    return mask.view_as(act_max)


def _plan_experts(layers: list[MoELayer], scores: list[torch.Tensor], ratio: float, allocation: str, comparable: bool) -> list[LayerPlan]:
    keep_sets: list[list[int]] = []
    if allocation in ("layer", "uniform"):
        for layer, s in zip(layers, scores):
            E, G = layer.num_experts, layer.num_groups
            per_group = E // G
            remove = int(round(ratio * E / G))  # same number from every group of a grouped router
            floor = min(2, per_group) if G > 1 else 1
            remove = min(remove, per_group - floor)
            keep: list[int] = []
            for g in range(G):
                idx = torch.arange(g * per_group, (g + 1) * per_group)
                order = idx[_ranking(s[idx])]
                keep.extend(order[: per_group - remove].tolist())
            keep_sets.append(sorted(keep))
    else:
        if any(l.num_groups > 1 for l in layers):
            raise UsageError("global expert allocation would unbalance a grouped router; use --allocation layer")
        normed = [s if comparable else _normalise(s) for s in scores]
        entries = torch.cat(normed)
        owner = torch.cat([torch.full((l.num_experts,), i) for i, l in enumerate(layers)])
        local = torch.cat([torch.arange(l.num_experts) for l in layers])
        total = entries.numel()
        n_remove = int(round(ratio * total))
        order = _ranking(entries).flip(0)  # least important first
        removed = [set() for _ in layers]
        for j in order.tolist():
            if n_remove == 0:
                break
            li = int(owner[j])
            if layers[li].num_experts - len(removed[li]) <= 1:  # every layer keeps at least one expert
                continue
            removed[li].add(int(local[j]))
            n_remove -= 1
        keep_sets = [sorted(set(range(l.num_experts)) - r) for l, r in zip(layers, removed)]
    return [
        LayerPlan(l.index, l.num_experts, l.widths[0], min(l.top_k, len(k)), k, [l.widths[0]] * len(k), None)
        for l, k in zip(layers, keep_sets)
    ]


def _plan_dims(
    layers: list[MoELayer], scores: list[torch.Tensor], ratio: float, allocation: str, comparable: bool, min_width: int, round_to: int,
    protected: list[torch.Tensor] | None = None,
) -> list[LayerPlan]:
    """Widths per expert, then each expert's best dims. Protected dims rank first in their expert and
    count as kept before the budget is spent (so too many of them show as a missed ratio)."""
    if protected is not None:
        scores = [torch.where(m, torch.full_like(s, math.inf), s) for s, m in zip(scores, protected)]
    widths_per_layer: list[torch.Tensor]
    if allocation == "uniform":
        width = layers[0].widths[0]
        w = max(_round_width(width * (1 - ratio), round_to), min(round_to, width), 1)
        widths_per_layer = [torch.full((l.num_experts,), min(w, width)) for l in layers]
    elif allocation == "layer":
        widths_per_layer = [_widths_from_ranking([l], [s], ratio, min_width, round_to)[0] for l, s in zip(layers, scores)]
    elif allocation == "layer_width":
        if experts_differ(layers):
            raise UsageError("--allocation layer_width needs the same number of experts in every MoE layer")
        normed = [s if comparable else _normalise(s) for s in scores]
        counts = _widths_from_ranking(layers, normed, ratio, min_width, 1)  # what the global ranking keeps per expert
        mean_width = torch.stack([c.double().mean() for c in counts])  # ... and per layer, spread over its experts
        floor = max(min_width, round_to, 1)
        layer_w = _round_counts(mean_width, round_to, layers[0].widths[0]) if round_to > 1 else mean_width.round().long()
        widths_per_layer = [torch.full((l.num_experts,), max(int(w), floor)) for l, w in zip(layers, layer_w)]
    else:
        normed = [s if comparable else _normalise(s) for s in scores]
        widths_per_layer = _widths_from_ranking(layers, normed, ratio, min_width, round_to)
    plans = []
    for l, s, widths in zip(layers, scores, widths_per_layer):
        widths = widths.clone()
        if l.num_groups > 1:  # grouped routers keep every expert: groups must stay equal
            widths = widths.clamp(min=max(min_width, round_to, 1))
        if int((widths > 0).sum()) == 0:  # a layer keeps at least its best expert
            best = int(_ranking(s.sum(1))[0])
            widths[best] = max(round_to, 1)
        kept = [e for e in range(l.num_experts) if widths[e] > 0]
        kept_dims = [sorted(_ranking(s[e])[: int(widths[e])].tolist()) for e in kept]
        plans.append(LayerPlan(l.index, l.num_experts, l.widths[0], min(l.top_k, len(kept)), kept, [int(widths[e]) for e in kept], kept_dims))
    return plans


def _widths_from_ranking(layers: list[MoELayer], scores: list[torch.Tensor], ratio: float, min_width: int, round_to: int) -> list[torch.Tensor]:
    """Keep the best dims across the given layers until (1 - ratio) of their parameters remain.

    The first `min_width` dims of every expert (by score) and dims scored +inf (protected) are kept
    regardless; widths are then rounded to multiples of `round_to` (an expert rounded to zero is removed)."""
    width = layers[0].widths[0]
    forced = []
    for s in scores:
        rank_in_expert = torch.argsort(_ranking_rows(s), dim=1)  # position of each dim in its expert's ranking
        forced.append((rank_in_expert < min_width) | (s == math.inf))
    entries = torch.cat([s.flatten() for s in scores])
    must = torch.cat([f.flatten() for f in forced])
    cost = torch.cat([torch.full((s.numel(),), l.params_per_dim(), dtype=torch.float64) for l, s in zip(layers, scores)])
    total = cost.sum()
    keep_budget = (1.0 - ratio) * total
    order = _ranking(torch.where(must, torch.full_like(entries, math.inf), entries))
    kept_cost = torch.cumsum(cost[order], 0)
    n_keep = int(torch.searchsorted(kept_cost, keep_budget - 1e-9).item()) + 1  # smallest prefix reaching the budget
    n_keep = min(max(n_keep, int(must.sum())), entries.numel()) if keep_budget > 0 else int(must.sum())
    keep = torch.zeros(entries.numel(), dtype=torch.bool)
    keep[order[:n_keep]] = True
    counts, start = [], 0
    for s in scores:
        counts.append(keep[start : start + s.numel()].view(s.shape).sum(1))
        start += s.numel()
    counts = _round_counts(torch.cat(counts), round_to, width) if round_to > 1 else torch.cat(counts)
    return list(counts.split([s.shape[0] for s in scores]))


def experts_differ(layers: list[MoELayer]) -> bool:
    return len({l.num_experts for l in layers}) > 1


def _round_counts(counts: torch.Tensor, round_to: int, width: int) -> torch.Tensor:
    """Widths in multiples of round_to whose total stays within half a step of the unrounded total
    (largest remainders get the extra steps; ties in expert order), so rounding many experts does not
    add up to a missed ratio. An expert whose width is not a multiple keeps at most its full width."""
    q = counts.double() / round_to
    units = q.floor()
    extra = int(round(float(q.sum()))) - int(units.sum())
    if extra > 0:
        units[_ranking(q - units)[:extra]] += 1
    return (units * round_to).clamp(max=width).to(torch.long)


def _ranking_rows(s: torch.Tensor) -> torch.Tensor:
    return torch.sort(s, dim=1, descending=True, stable=True).indices
