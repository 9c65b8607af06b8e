"""Building replaced experts (LightMoE-style): group bases and low-rank corrections, from a replace plan.

Pure functions over one `MoELayer`: `build_replaced` returns a `ReplacedExperts` module and changes
nothing; `install_layer` (moetrim.model.replaced) puts it in the model and records it for saving;
`apply_replace_plan` does both for every layer a `ReplacePlan` (moetrim.plan.replace) names.

- A group's base is the weighted average of its members' weights (uniform, usage, Fisher or
  Fisher·usage weights), each of gate, up and down.
- A member's correction is the best rank-r approximation of W_e − W_base per matrix (truncated SVD),
  optionally whitened by the Gram XᵀX of that matrix's own calibration inputs (SVD-LLM, as D²-MoE
  does for each expert's w1, w3 and w2): the member's routed hidden states for gate and up, its
  intermediate activations h = act(gate)·up on the original weights for down. Minimising
  ‖(Δ − Δ')X‖ rather than ‖Δ − Δ'‖ spends the rank on the directions the member's tokens use.
- `init="zero"` is naive replacing: the correction starts at zero (B = 0, A small and random as in
  LoRA, so it can still learn; A = B = 0 would receive no gradient at all).

Which experts share a base is the plan's decision (moetrim.plan.cluster groups them).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from torch import nn

from moetrim.errors import UsageError
from moetrim.model.identity import model_fingerprint
from moetrim.model.replaced import ReplacedExperts, check_layout, check_replaceable, install_layer
from moetrim.model.view import MoELayer, find_moe_layers, require_uniform_widths
from moetrim.plan.replace import ReplacePlan, profile_has

INITS = ("svd", "zero")
# Whitening adds this fraction of the Gram's mean diagonal before the Cholesky factorisation (GPTQ's
# default damping): with fewer routed tokens than hidden dimensions XᵀX is singular, and an undamped
# S⁻¹ would put large weights on directions no calibration token ever used.
WHITEN_DAMP = 0.01


def build_replaced(
    layer: MoELayer,
    kept: Sequence[int],
    groups: Sequence[Sequence[int]],
    rank: int,
    *,
    base_weights: dict[int, float] | None = None,
    init: str = "svd",
    gram: torch.Tensor | None = None,
    mid_gram: torch.Tensor | None = None,
    seed: int = 0,
    novices: Sequence[int] = (),
    novice_out: torch.Tensor | None = None,
) -> ReplacedExperts:
    """A `ReplacedExperts` for `layer` (not installed): `kept` experts as they are, one base per group,
    each member's rank-`rank` correction from `init`. gram: [E, H, H] input Grams (a profile's in_gram)
    to whiten the gate/up corrections with; mid_gram: [E, I, I] Grams of down_proj's inputs (mid_gram)
    to whiten the down corrections with; seed: the random A of `init="zero"`; novices: experts that become a
    constant output (MoNE), novice_out [len(novices), H] their vectors in increasing id."""
    require_uniform_widths([layer], "replace experts of")
    check_replaceable(layer)
    E, H, I = layer.num_experts, layer.hidden_size, layer.widths[0]
    check_layout(E, I, H, kept, groups, rank, novices)
    if novices and (novice_out is None or tuple(novice_out.shape) != (len(novices), H)):
        raise UsageError(f"novice_out must be [{len(novices)}, {H}] (one output vector per novice)")
    if init not in INITS:
        raise UsageError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    if gram is not None and tuple(gram.shape) != (E, H, H):
        raise UsageError(f"gram must be [{E}, {H}, {H}] (one input Gram per expert), got {list(gram.shape)}")
    if mid_gram is not None and tuple(mid_gram.shape) != (E, I, I):
        raise UsageError(f"mid_gram must be [{E}, {I}, {I}] (one down_proj input Gram per expert), got {list(mid_gram.shape)}")
    if (gram is not None or mid_gram is not None) and init != "svd":
        raise UsageError("a gram whitens the SVD of the corrections; it needs init='svd'")
    ref = layer.expert(0).up
    mod = ReplacedExperts(E, H, I, kept, groups, rank, layer.activation(), novices=novices, dtype=ref.dtype, device=ref.device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if mod.novices:
            order = sorted(range(len(novices)), key=lambda i: novices[i])
            mod.novice_out.copy_(novice_out[order])
        for u, e in enumerate(mod.kept):
            gate_up, down = _stacked(layer, e)
            mod.kept_gate_up[u].copy_(gate_up)
            mod.kept_down[u].copy_(down)
        for g, members in enumerate(mod.groups):
            omega = _group_weights(members, base_weights)
            weights = [_stacked(layer, e) for e in members]
            base_gu = sum(w * gu.double() for w, (gu, _) in zip(omega, weights))
            base_down = sum(w * d.double() for w, (_, d) in zip(omega, weights))
            mod.base_gate_up[g].copy_(base_gu)
            mod.base_down[g].copy_(base_down)
            if not rank:
                continue
            for e, (gu, down) in zip(members, weights):
                m = mod.member_of_expert[e]
                deltas = {"gate": gu[:I].double() - base_gu[:I], "up": gu[I:].double() - base_gu[I:], "down": down.double() - base_down}
                chol = _whitener(gram[e].to(gu.device)) if gram is not None else None
                chol_mid = _whitener(mid_gram[e].to(gu.device)) if mid_gram is not None else None
                for name, delta in deltas.items():
                    if init == "zero":
                        a, b = _zero_init(delta, rank, gen)
                    else:
                        a, b = low_rank(delta, rank, chol_mid if name == "down" else chol)
                    getattr(mod, f"{name}_a")[m].copy_(a)
                    getattr(mod, f"{name}_b")[m].copy_(b)
    mod.requires_grad_(any(p.requires_grad for p in layer.experts.parameters()))
    return mod


def _stacked(layer: MoELayer, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e as (gate_up [2I, H] with gate rows first, down [H, I])."""
    w = layer.expert(e)
    return torch.cat([w.gate, w.up]), w.down


def _group_weights(members: list[int], base_weights: dict[int, float] | None) -> list[float]:
    """Members' averaging weights, summing to 1; uniform when none are given or they sum to 0 (a group
    of experts no calibration token reached)."""
    if base_weights is None:
        return [1.0 / len(members)] * len(members)
    missing = [e for e in members if e not in base_weights]
    if missing:
        raise UsageError(f"base_weights has no weight for experts {missing}")
    w = [float(base_weights[e]) for e in members]
    if any(not math.isfinite(v) or v < 0 for v in w):
        raise UsageError(f"base_weights must be finite and >= 0, got {w} for experts {members}")
    total = sum(w)
    return [v / total for v in w] if total > 0 else [1.0 / len(members)] * len(members)


def _whitener(gram: torch.Tensor) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = XᵀX + λI (λ: `WHITEN_DAMP` of the mean diagonal; 1 for an unused
    expert, whose corrections then fall back to the plain SVD)."""
    g = gram.double()
    scale = float(g.diagonal().mean())
    lam = WHITEN_DAMP * scale if scale > 0 else 1.0
    return torch.linalg.cholesky(g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))


def low_rank(delta: torch.Tensor, rank: int, chol: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B A the best rank-r approximation of delta [out, in]: in Frobenius
    norm, or with chol (S Sᵀ = XᵀX) in ‖(Δ − BA) X‖ — SVD of Δ S, then A ← A S⁻¹. The singular values
    are split evenly (√σ on each side), so both factors start at one scale for training. A component
    with σ ≈ 0 (Δ of lower rank than r; Δ = 0 for a group of one) gets B = 0 and its unit singular
    vector in A rather than zeros on both sides, which no gradient could ever move."""
    target = delta if chol is None else delta @ chol
    U, s, Vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    dead = s[:rank] <= 1e-6 * float(s[0])  # all of them when Δ = 0
    root_b = root.masked_fill(dead, 0.0)
    a, b = torch.where(dead, 1.0, root)[:, None] * Vh[:rank], U[:, :rank] * root_b
    if chol is not None:
        a = torch.linalg.solve_triangular(chol, a, upper=False, left=False)  # a S⁻¹
    return a, b


def _zero_init(delta: torch.Tensor, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """B = 0 and A uniform in ±1/√in (peft's LoRA initialisation): the correction starts at zero."""
    out_dim, in_dim = delta.shape
    bound = 1.0 / math.sqrt(in_dim)
    a = (torch.rand(rank, in_dim, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return a, torch.zeros(out_dim, rank, dtype=torch.float64)


def apply_replace_plan(model: nn.Module, plan: ReplacePlan, profile=None) -> nn.Module:
    """Build every planned layer's `ReplacedExperts` from the model's own weights and install it (in place)."""
    if plan.model_fingerprint != model_fingerprint(model):
        raise UsageError("this plan was made for another model (its fingerprint differs); plan again on this model")
    if plan.granularity == "ream":  # merged into centroids and sliced: a standard model, not replaced experts
        from moetrim.apply.ream import apply_ream_plan

        return apply_ream_plan(model, plan)
    layers = {l.index: l for l in find_moe_layers(model)}
    for lp in plan.layers:
        if not lp.groups and not lp.novices:
            continue
        layer = layers.get(lp.layer)
        if layer is None or layer.num_experts != lp.experts_before:
            raise UsageError(f"plan layer {lp.layer} does not match the model's MoE layers")
        install_layer(model, layer, build_planned_layer(layer, lp, profile, plan.seed))
    return model


def build_planned_layer(layer: MoELayer, lp, profile=None, seed: int = 0) -> ReplacedExperts:
    """The `ReplacedExperts` one planned layer (a ReplaceLayer) describes, built from `layer`'s own weights
    (not installed); the profile gives whitening Grams and novices' mean outputs where the plan asks for them."""
    gram = mid_gram = None
    if lp.whiten:
        if profile is None or not profile_has(profile, [layer], "in_gram") or not profile_has(profile, [layer], "mid_gram"):
            raise UsageError("this plan whitens its corrections: give the profile with the experts' input Grams (calibrate --whiten)")
        gram, mid_gram = profile.get(lp.layer, "in_gram"), profile.get(lp.layer, "mid_gram")
    novice_out = None
    if lp.novices:
        if profile is None:
            raise UsageError("this plan has novices (MoNE): give the profile it was made from (--profile; their outputs are its mean outputs)")
        from moetrim.plan.cluster import mean_outputs

        novice_out = mean_outputs(profile, lp.layer)[lp.novices]
    weights = {int(e): w for e, w in lp.base_weights.items()}
    return build_replaced(layer, lp.kept, lp.groups, lp.rank, base_weights=weights, init=lp.init, gram=gram, mid_gram=mid_gram,
                          seed=seed, novices=lp.novices, novice_out=novice_out)
