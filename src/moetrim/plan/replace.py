"""Plans that replace experts instead of deleting them: replace, naive, merge and D²-MoE.

Every method is priced in stored routed-expert parameters (kept experts, group bases and low-rank
factors all count), so `ratio` means what it means for dims and experts: the fraction removed.

- `replace` (LightMoE-style): the least important experts (an expert criterion, REAP by default,
  normalised within each layer, ranked globally) are replaced; each layer keeps at least its top-k
  experts. Replaced experts are clustered by the cosine of their mean routed outputs (average
  linkage, at most `max_group` per group); each group gets a usage-weighted base and each member a
  rank-r correction initialised from the (optionally whitened) SVD of its difference to the base.
- `naive`: the same selection, one base per layer for all its replaced experts, corrections
  starting at zero (the plain version LightMoE improves on).
- `merge` (HC-SMoE, wazenmai/HC-SMoE `hcsmoe/merging/grouping_qwen.py`): every layer's experts
  clustered into ⌊E·(1−ratio)⌋ groups by average linkage on the Euclidean distance between their
  mean outputs over the *same* calibration tokens (the profile's dense_out_sum: every expert on
  every token, so routing does not decide similarity); a group becomes one usage-weighted
  (frequency) expert that takes the summed routing weight of its members (rank 0); singletons are
  kept as they are.
- `d2` (D²-MoE, lliai/D2MoE `model/merge_mixtral.py`, training-free): one base per layer from every
  expert, each expert a rank-r delta whitened on gate, up and down by the Grams of their own inputs
  (SVD-LLM), r the largest the budget allows. Where we differ from the authors' code: (1) base
  weights are Fisher alone when the profile has Fisher, else usage. The authors multiply a
  per-weight Fisher by routing frequency; a Fisher summed over calibration sequences already grows
  with the tokens an expert is routed, so the product counts usage twice. Ours is one weight per
  expert (its mask Fisher summed over its intermediate dimensions), not one per weight entry.
  (2) The authors' base-weight pruning (`pp_ratio`, 0.2: dynamic, input-probed pruning of the
  base's intermediate dimensions at inference) is not implemented: the base is stored and run
  whole. (3) The delta rank is set by the budget, not by their `delta_ratio`.
- `novice` (MoNE, zxgx/mode-pd `modepd/pruning/expert_prune.py`; the CLI's `--granularity experts
  --novice`): in every layer the round(ratio·E) experts an expert criterion ranks lowest (MoNE's own,
  `mone`, by default) become novices, each a constant vector, its mean output over its routed tokens
  (the profile's out_sum / count), added with the routing weight the router gives it; the router is
  untouched, so novices keep their top-k slots. The novices' H parameters each are counted as stored.
- `ream` (REAM, SamsungSAILMontreal/ream; the CLI's `--granularity merge --merge-method ream`): in every
  layer the ⌊E·(1−ratio)⌋ most salient experts (at least top-k) are centroids, each absorbing its nearest
  others (moetrim.plan.ream); groups are merged into their centroid after neuron matching and the other
  experts leave the router (moetrim.apply.ream), so the result is a standard checkpoint. Groups list the
  centroid first; base_weights hold the saliencies the merge averages with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moetrim.errors import UsageError
from moetrim.model.view import MoELayer, find_moe_layers, require_uniform_widths
from moetrim.plan.cluster import cluster_experts, dense_mean_outputs, mean_outputs
from moetrim.plan.schema import REPLACE_METHODS, PlanFile

METHODS = REPLACE_METHODS
BASE_WEIGHTINGS = ("usage", "uniform", "fisher", "fisher_usage")
SCHEMA_VERSION = 1


@dataclass
class ReplaceLayer:
    layer: int
    experts_before: int
    width: int
    top_k: int
    kept: list[int]
    groups: list[list[int]]
    rank: int
    base_weights: dict[str, float]  # expert id -> its weight in its group's base
    init: str  # svd or zero
    whiten: bool
    novices: list[int] = field(default_factory=list)  # experts replaced by a constant output (MoNE)


@dataclass
class ReplacePlan(PlanFile):
    granularity: str  # one of METHODS
    criterion: str
    ratio: float
    rank: int
    max_group: int
    base_weighting: str
    seed: int
    model_fingerprint: str
    profile_digest: str | None
    params_before: int
    params_after: int
    layers: list[ReplaceLayer]
    allocation: str = "global"
    schema_version: int = SCHEMA_VERSION
    notes: list[str] = field(default_factory=list)

    @property
    def checkpoint_format(self) -> str:
        """What applying it writes: REAM merges into centroids and slices (standard), the others replaced experts."""
        return "standard" if self.granularity == "ream" else "replaced"

    @classmethod
    def from_dict(cls, d: dict) -> "ReplacePlan":
        if not isinstance(d, dict) or d.get("granularity") not in METHODS or not isinstance(d.get("layers"), list):
            raise UsageError(f"not a replace plan (granularity one of {', '.join(METHODS)} and a list of layers)")
        d = dict(d)
        d.pop("removed_fraction", None)
        try:
            layers = [ReplaceLayer(**l) for l in d.pop("layers")]
            return cls(layers=layers, **d)
        except TypeError as exc:
            raise UsageError(f"plan fields do not match a replace plan ({exc})") from None


def is_replace_granularity(name: str | None) -> bool:
    return name in METHODS


def expert_params(layer: MoELayer) -> int:
    return layer.params_at([layer.widths[0]])


def factor_params(layer: MoELayer, rank: int) -> int:
    """One replaced expert's rank-r corrections on gate, up and down."""
    return rank * 3 * (layer.hidden_size + layer.widths[0])


def _stored(layer: MoELayer, kept: int, groups: int, replaced: int, rank: int, novices: int = 0) -> int:
    return (kept + groups) * expert_params(layer) + replaced * factor_params(layer, rank) + novices * layer.hidden_size


def stored_params(layer: MoELayer, rl: ReplaceLayer) -> int:
    """The routed-expert parameters `layer` stores under this replaced layout (how every replace plan prices it)."""
    return _stored(layer, len(rl.kept), len(rl.groups), sum(len(g) for g in rl.groups), rl.rank, len(rl.novices))


def _base_weights(profile, layer: MoELayer, members: list[int], weighting: str) -> dict[str, float]:
    """Each member's (unnormalised) weight in its base: 1, its routed-token count, its Fisher (summed over
    its intermediate dimensions: already a sum over the sequences routed to it), or Fisher × count
    (the literal product of D²-MoE's code, which counts usage twice)."""
    if weighting == "uniform":
        return {str(e): 1.0 for e in members}
    count = profile.get(layer.index, "count").double()
    if weighting in ("fisher", "fisher_usage"):
        fisher = profile.get(layer.index, "fisher").double().sum(dim=1)
        w = fisher * count if weighting == "fisher_usage" else fisher
    else:
        w = count
    return {str(e): float(w[e]) for e in members}


def profile_has(profile, layers: list[MoELayer], name: str) -> bool:
    return all(f"layers.{l.index}.{name}" in profile.stats for l in layers)


def check_replace_options(method: str, ratio: float, rank: int, max_group: int, weighting: str | None, layers: list[MoELayer]) -> None:
    """UsageError for options no profile can make valid (checked before calibrating)."""
    if method not in METHODS:
        raise UsageError(f"unknown replace method '{method}'; choose {', '.join(METHODS)}")
    if not 0 <= ratio < 1:
        raise UsageError(f"--ratio must be in [0, 1), got {ratio}")
    most = min(layers[0].widths[0], layers[0].hidden_size)  # a difference of two [I, H] matrices has rank <= min(I, H)
    if method in ("replace", "naive") and (not isinstance(rank, int) or not 0 < rank <= most):
        raise UsageError(f"--rank must be between 1 and {most} (the experts' width {layers[0].widths[0]}, hidden "
                         f"{layers[0].hidden_size}), got {rank}")
    if not isinstance(max_group, int) or max_group < 2:
        raise UsageError(f"--max-group must be at least 2 (a group of one stores a base and corrections for one expert), got {max_group}")
    if weighting is not None and weighting not in BASE_WEIGHTINGS:
        raise UsageError(f"unknown base weighting '{weighting}'; choose {', '.join(BASE_WEIGHTINGS)}")


def d2_rank(layer: MoELayer, ratio: float) -> int:
    """D²-MoE's delta rank at `ratio`: the largest with one base + E rank-r deltas per layer under the budget
    (0 where none fits), from 128 up a multiple of 8 (under 6% of the rank): grouped GEMMs need 16-byte
    strides in bf16."""
    P, E = expert_params(layer), layer.num_experts
    budget = (1 - ratio) * E * P - P
    r = min(int(budget // (E * factor_params(layer, 1))) if budget > 0 else 0, layer.widths[0])
    return r - r % 8 if r >= 128 else r


def make_replace_plan(
    model: nn.Module,
    profile,
    *,
    method: str = "replace",
    ratio: float = 0.5,
    rank: int = 16,
    criterion: str | None = None,
    max_group: int = 8,
    base_weighting: str | None = None,
    whiten: bool | None = None,
    seed: int = 0,
) -> ReplacePlan:
    """A reviewable plan of which experts are kept, grouped and corrected at what rank, priced in stored
    parameters so that it removes at least `ratio` of the routed-expert parameters. `base_weighting` None
    is the method's own: usage counts, for D²-MoE Fisher (usage without gradients in the profile)."""
    from moetrim import criteria

    criterion = criterion or ("mone" if method == "novice" else "reap")
    layers = find_moe_layers(model)
    require_uniform_widths(layers, "replace experts of")
    check_replace_options(method, ratio, rank, max_group, base_weighting, layers)
    profile.check_model(layers)
    if base_weighting is None:
        base_weighting = "fisher" if method == "d2" and profile.has_gradients else "usage"
    if base_weighting in ("fisher", "fisher_usage") and not profile.has_gradients:
        raise UsageError(f"--base-weighting {base_weighting} needs a profile with Fisher (calibrate without --no-fisher)")
    has_gram = profile_has(profile, layers, "in_gram") and profile_has(profile, layers, "mid_gram")
    whiten = has_gram if whiten is None else whiten
    if whiten and not has_gram:
        raise UsageError("whitened corrections need the experts' input Grams (in_gram and mid_gram): calibrate with --whiten")
    before = sum(l.num_experts * expert_params(l) for l in layers)
    target = math.ceil(ratio * before - 1e-9)
    notes: list[str] = []

    if method == "merge":
        if not profile_has(profile, layers, "dense_out_sum"):
            raise UsageError("--granularity merge (HC-SMoE) clusters experts by their outputs on the same tokens: calibrate "
                             "with --dense-outputs (every expert runs on every calibration token)")
        plan_layers = []
        for l in layers:
            n = max(l.top_k, math.floor(l.num_experts * (1 - ratio) + 1e-9))  # at least the ratio, as every method
            groups = cluster_experts(dense_mean_outputs(profile, l.index), list(range(l.num_experts)), max_group=l.num_experts,
                                     num_groups=n, metric="euclidean")
            kept = sorted(g[0] for g in groups if len(g) == 1)
            merged = [g for g in groups if len(g) > 1]
            plan_layers.append(_layer(l, kept, merged, 0, profile, base_weighting, "svd", False))
        return _finish(method, "output_similarity", ratio, 0, max_group, base_weighting, seed, model, profile, layers, plan_layers, before, notes)

    if method == "novice":
        plan_layers = []
        for l in layers:
            s = criteria.score(criterion, "expert", profile, l, seed=seed)
            n = min(int(round(ratio * l.num_experts)), l.num_experts - 1)  # MoNE: the same count per layer; one expert stays
            novices = sorted(torch.sort(s, stable=True).indices[:n].tolist())  # lowest first; ties to the lower id
            kept = [e for e in range(l.num_experts) if e not in novices]
            plan_layers.append(ReplaceLayer(l.index, l.num_experts, l.widths[0], l.top_k, kept, [], 0, {}, "svd", False, novices))
        return _finish(method, criterion, ratio, 0, max_group, base_weighting, seed, model, profile, layers, plan_layers, before, notes)

    if method == "ream":
        from moetrim.plan import ream

        plan_layers = []
        for l in layers:
            keep = max(l.top_k, math.floor(l.num_experts * (1 - ratio) + 1e-9))
            sal = ream.saliency(profile, l.index)
            gs = ream.groups(sal, ream.distances(profile, l.index), keep)
            plan_layers.append(ReplaceLayer(l.index, l.num_experts, l.widths[0], l.top_k, [], gs, 0,
                                            {str(e): float(sal[e]) for g in gs for e in g}, "svd", False))
        notes.append(f"REAM: groups of at most {ream.GROUP_SIZE}, centroid first; merged after neuron matching, the rest "
                     "leave the router (a standard checkpoint)")
        return _finish(method, "ream_saliency", ratio, 0, ream.GROUP_SIZE, "saliency", seed, model, profile, layers, plan_layers,
                       before, notes)

    if method == "d2":
        E = layers[0].num_experts
        r = d2_rank(layers[0], ratio)
        if r < 1:
            raise UsageError(f"--ratio {ratio} is unreachable with D²-MoE: one shared base per layer alone keeps {1 / E:.0%} "
                             "of the routed parameters and leaves no room for any delta; lower --ratio")
        plan_layers = [_layer(l, [], [list(range(l.num_experts))], r, profile, base_weighting, "svd", whiten) for l in layers]
        notes.append(f"D²-MoE delta rank {r}: the largest the budget allows (from 128 up rounded down to a multiple of 8, "
                     "so the replaced experts run on grouped GEMMs)")
        return _finish(method, "-", ratio, r, max_group, base_weighting, seed, model, profile, layers, plan_layers, before, notes)

    # replace / naive: a global ranking of per-layer-normalised scores; each layer keeps its top-k
    features = {l.index: mean_outputs(profile, l.index) for l in layers}
    scores = {}
    for l in layers:
        s = criteria.score(criterion, "expert", profile, l, seed=seed)
        scores[l.index] = s / s.sum() if float(s.sum()) > 0 else torch.full_like(s, 1.0 / l.num_experts)
    candidates = []
    for l in layers:
        protected = set(torch.sort(scores[l.index], descending=True, stable=True).indices[: l.top_k].tolist())
        candidates += [(float(scores[l.index][e]), l.index, e) for e in range(l.num_experts) if e not in protected]
    candidates.sort()
    by_index = {l.index: l for l in layers}

    def build(q: int) -> tuple[list[ReplaceLayer], int]:
        chosen: dict[int, list[int]] = {l.index: [] for l in layers}
        for _, li, e in candidates[:q]:
            chosen[li].append(e)
        out, stored = [], 0
        for l in layers:
            rep = sorted(chosen[l.index])
            kept = [e for e in range(l.num_experts) if e not in rep]
            if method == "naive":
                groups = [rep] if rep else []
            else:
                groups = cluster_experts(features[l.index], rep, max_group=max_group) if rep else []
            lp = _layer(by_index[l.index], kept, groups, rank if rep else 0, profile, base_weighting,
                        "zero" if method == "naive" else "svd", whiten and method == "replace")
            out.append(lp)
            stored += _stored(l, len(kept), len(groups), len(rep), rank)
        return out, stored

    # ratio 0 replaces nothing: the full replacement is no bound on it (at a rank whose corrections cost more
    # than the experts they replace it removes less than nothing, and the search would then replace everything)
    lo, hi = 0, len(candidates) if target > 0 else 0
    if target > 0:
        full_stored = build(hi)[1]
        if before - full_stored < target:
            most = 1 - full_stored / before
            gain = f"removes at most {most:.1%}" if most > 0 else "stores more than it removes (bases and corrections outweigh the experts)"
            raise UsageError(f"--ratio {ratio} is unreachable at rank {rank}: replacing every expert but each layer's top-k "
                             f"{gain}; lower --rank or --ratio, or raise --max-group")
    while lo < hi:  # the fewest replaced experts that remove at least the target
        mid = (lo + hi) // 2
        if before - build(mid)[1] >= target:
            hi = mid
        else:
            lo = mid + 1
    plan_layers, _ = build(lo)
    return _finish(method, criterion, ratio, rank, max_group, base_weighting, seed, model, profile, layers, plan_layers, before, notes)


def _layer(l: MoELayer, kept, groups, rank, profile, weighting, init, whiten) -> ReplaceLayer:
    members = [e for g in groups for e in g]
    return ReplaceLayer(l.index, l.num_experts, l.widths[0], l.top_k, list(kept), [list(g) for g in groups],
                        rank if groups else 0, _base_weights(profile, l, members, weighting), init, bool(whiten))


def _finish(method, criterion, ratio, rank, max_group, weighting, seed, model, profile, layers, plan_layers, before, notes) -> ReplacePlan:
    from moetrim.model.identity import model_fingerprint

    by_index = {l.index: l for l in layers}
    after = sum(stored_params(by_index[p.layer], p) for p in plan_layers)
    return ReplacePlan(method, criterion, float(ratio), int(rank), int(max_group), weighting, int(seed), model_fingerprint(model),
                       profile.meta.get("data_digest"), int(before), int(after), plan_layers, notes=notes)
