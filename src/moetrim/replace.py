"""Building replaced experts (LightMoE-style): group bases, low-rank corrections, expert clustering.

Pure functions over one `MoELayer`: `build_replaced` returns a `ReplacedExperts` module and changes
nothing; `install_layer` (moetrim.model.replaced) puts it in the model and records it for saving.

- A group's base is the weighted average of its members' weights (uniform, usage, Fisher or
  Fisher·usage weights), each of gate, up and down.
- A member's correction is the best rank-r approximation of W_e − W_base per matrix (truncated SVD),
  optionally whitened by the Gram XᵀX of that matrix's own calibration inputs (SVD-LLM, as D²-MoE
  does for each expert's w1, w3 and w2): the member's routed hidden states for gate and up, its
  intermediate activations h = act(gate)·up on the original weights for down. Minimising
  ‖(Δ − Δ')X‖ rather than ‖Δ − Δ'‖ spends the rank on the directions the member's tokens use.
- `init="zero"` is naive replacing: the correction starts at zero (B = 0, A small and random as in
  LoRA, so it can still learn; A = B = 0 would receive no gradient at all).
- `cluster_experts` groups experts by average-linkage agglomerative clustering of feature rows, on
  cosine similarity (replace: mean routed outputs) or Euclidean distance (HC-SMoE's merge: every
  expert's mean output over the same tokens, wazenmai/HC-SMoE `hcsmoe/merging/clustering.py`), never
  above `max_group` members.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from moetrim.errors import UsageError
from moetrim.model.replaced import ReplacedExperts, check_layout, check_replaceable
from moetrim.model.view import MoELayer, require_uniform_widths

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
) -> ReplacedExperts:
    """A `ReplacedExperts` for `layer` (not installed): `kept` experts as they are, one base per group,
    each member's rank-`rank` correction from `init`. gram: [E, H, H] input Grams (a profile's in_gram)
    to whiten the gate/up corrections with; mid_gram: [E, I, I] Grams of down_proj's inputs (mid_gram)
    to whiten the down corrections with; seed: the random A of `init="zero"`."""
    require_uniform_widths([layer], "replace experts of")
    check_replaceable(layer)
    E, H, I = layer.num_experts, layer.hidden_size, layer.widths[0]
    check_layout(E, I, H, kept, groups, rank)
    if init not in INITS:
        raise UsageError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    if gram is not None and tuple(gram.shape) != (E, H, H):
        raise UsageError(f"gram must be [{E}, {H}, {H}] (one input Gram per expert), got {list(gram.shape)}")
    if mid_gram is not None and tuple(mid_gram.shape) != (E, I, I):
        raise UsageError(f"mid_gram must be [{E}, {I}, {I}] (one down_proj input Gram per expert), got {list(mid_gram.shape)}")
    if (gram is not None or mid_gram is not None) and init != "svd":
        raise UsageError("a gram whitens the SVD of the corrections; it needs init='svd'")
    ref = layer.expert(0).up
    mod = ReplacedExperts(E, H, I, kept, groups, rank, layer.activation(), dtype=ref.dtype, device=ref.device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
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


def mean_outputs(profile, layer: int) -> torch.Tensor:
    """Each expert's mean output over its routed tokens, out_sum / count [E, H] (zero for an unused expert)."""
    count = profile.get(layer, "count").double()
    return profile.get(layer, "out_sum").double() / count.clamp(min=1)[:, None]


def dense_mean_outputs(profile, layer: int) -> torch.Tensor:
    """Each expert's mean output over every calibration token, dense_out_sum / tokens [E, H]: all experts
    on the same tokens, so two experts' similarity depends on their weights, not on where the router
    sent tokens (HC-SMoE's clustering features)."""
    tokens = float(profile.get(layer, "tokens").reshape(()))
    return profile.get(layer, "dense_out_sum").double() / max(tokens, 1.0)


def cluster_experts(
    features: torch.Tensor, experts: Sequence[int], *, max_group: int, num_groups: int | None = None, metric: str = "cosine"
) -> list[list[int]]:
    """Group `experts` (ids into the rows of features [E, H], e.g. `mean_outputs`) by average-linkage
    agglomerative clustering, never above `max_group` members. metric "cosine": the average cosine
    similarity between members; "euclidean": the average Euclidean distance (HC-SMoE's).

    Merges the most similar pair of clusters whose union fits until `num_groups` remain (default: as
    few as `max_group` allows, ⌈n / max_group⌉) or no pair fits; so the result may hold more groups than
    asked. Deterministic: ties go to the lowest pair of cluster positions. Groups come back sorted,
    each by id and all by first member. Under cosine a zero feature row (an unused expert) is similar
    to nothing (0)."""
    ids = [int(e) for e in experts]
    n = len(ids)
    if not isinstance(max_group, int) or max_group < 1:
        raise UsageError(f"max_group must be a whole number >= 1, got {max_group!r}")
    if len(set(ids)) != n or any(not 0 <= e < features.shape[0] for e in ids):
        raise UsageError(f"experts to cluster must be distinct ids below {features.shape[0]}, got {ids}")
    if n == 0:
        return []
    target = math.ceil(n / max_group) if num_groups is None else num_groups
    if not isinstance(target, int) or not 1 <= target <= n:
        raise UsageError(f"num_groups must be between 1 and the {n} experts to cluster, got {num_groups!r}")
    if metric not in ("cosine", "euclidean"):
        raise UsageError(f"unknown clustering metric {metric!r}; choose cosine or euclidean")
    f = features[ids].double().cpu()
    if metric == "cosine":
        f = f / f.norm(dim=1, keepdim=True).clamp(min=1e-30)
        link = f @ f.T  # link[a, b]: Σ similarity over member pairs of clusters a and b
    else:
        link = -torch.cdist(f, f)  # a similarity: minus the distance, summed over member pairs the same way
    members: list[list[int] | None] = [[i] for i in range(n)]
    size = torch.ones(n, dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    for _ in range(n - target):
        average = link / (size[:, None] * size[None, :])
        ok = upper & alive[:, None] & alive[None, :] & (size[:, None] + size[None, :] <= max_group)
        if not ok.any():
            break
        best = int(torch.where(ok, average, torch.tensor(-math.inf, dtype=torch.float64)).flatten().argmax())
        a, b = divmod(best, n)
        link[a] += link[b]
        link[:, a] += link[:, b]
        size[a] += size[b]
        alive[b] = False
        members[a] = members[a] + members[b]
        members[b] = None
    return sorted((sorted(ids[i] for i in m) for m in members if m is not None), key=lambda g: g[0])
