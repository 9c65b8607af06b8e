"""Expert-level criteria, all special cases of one formula over routing, gate weight and activation:

    S_e(a, b, p) = |R_e|^(a-1) · Σ_{x∈R_e} g_e(x)^b · ‖y_e(x)‖^p

R_e: tokens routed to e; g: the weight the model applies (after any top-k renormalisation and
scaling); y: the expert's output before gating. The profile stores Σ g^b‖y‖^p for b, p ∈ {0, 1, 2}.
"""

from __future__ import annotations

import torch

from moetrim.calibrate.profile import Profile
from moetrim.criteria import register
from moetrim.errors import UsageError
from moetrim.model.view import MoELayer


def unified_score(profile: Profile, layer: int, a: float, b: int, p: int) -> torch.Tensor:
    """S(a, b, p) per expert; experts never routed score 0."""
    if b not in (0, 1, 2) or p not in (0, 1, 2):
        raise UsageError("exponents b and p must be 0, 1 or 2 (the profile stores those moments)")
    moments = profile.get(layer, "moments").double()
    count = moments[:, 0, 0]
    total = moments[:, b, p]
    scale = torch.where(count > 0, count.clamp(min=1).pow(a - 1), torch.zeros_like(count))
    return scale * total


def _unified(a: float, b: int, p: int, name: str, doc: str):
    def fn(profile: Profile, layer: MoELayer, **_) -> torch.Tensor:
        return unified_score(profile, layer.index, a, b, p)

    fn.__doc__ = doc
    register(name, "expert", comparable=(a == 1 and p == 0), doc=doc)(fn)


_unified(1, 0, 0, "frequency", "S(1,0,0): routed-token count")
_unified(1, 1, 0, "soft_frequency", "S(1,1,0): sum of gate weights over routed tokens")
_unified(1, 0, 1, "ean", "S(1,0,1): expert activation norm, sum of ||y|| over routed tokens (EAN)")
_unified(0, 1, 1, "reap", "S(0,1,1): mean over routed tokens of g*||y|| (REAP)")
_unified(0, 0, 1, "man", "S(0,0,1): mean activation norm over routed tokens (MAN)")
_unified(0, 0, 2, "msan", "S(0,0,2): mean squared activation norm over routed tokens (MSAN)")


@register("soft_frequency_prob", "expert", comparable=True)
def soft_frequency_prob(profile: Profile, layer: MoELayer, **_) -> torch.Tensor:
    """Sum of router probability over all tokens (routed or not)."""
    return profile.get(layer.index, "prob_sum").double()


@register("unified", "expert", comparable=False)
def unified(profile: Profile, layer: MoELayer, *, a: float = 0.0, b: int = 0, p: int = 1, **_) -> torch.Tensor:
    """S(a, b, p) with user-set exponents (--exponents a,b,p)."""
    return unified_score(profile, layer.index, a, b, p)


@register("random", "expert", comparable=True, profile=False)
def random_experts(profile: Profile | None, layer: MoELayer, *, seed: int = 0, **_) -> torch.Tensor:
    """Uniform random scores (a baseline), seeded per layer."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer.index)
    return torch.rand(layer.num_experts, generator=gen, dtype=torch.float64)


@register("aimer", "expert", comparable=True, weights=True, profile=False)
def aimer(profile: Profile | None, layer: MoELayer, **_) -> torch.Tensor:
    """1 − AIMER: weights only, no data. AIMER is ‖θ‖₁ / (√N ‖θ‖₂) over all N entries of an expert's gate, up and
    down pooled, which the authors prune highest first (ZongfangLiu/AIMER `src/calib_free_prune.py`): a flat
    (Gaussian-like, ≈ 0.80) expert goes first, a heavy-tailed one stays. Ours ranks 1 − that ratio, so higher
    keeps as for every criterion; the selection is theirs with the default `--allocation layer` (the same count
    per layer, each layer keeping at least top-k). Ties keep index order (theirs: torch.sort's unspecified order)."""
    scores = []
    for e in range(layer.num_experts):
        w = layer.expert(e)
        mats = [m.detach().float() for m in (w.gate, w.up, w.down) if m is not None]
        n = sum(m.numel() for m in mats)
        l1 = sum(float(m.abs().double().sum()) for m in mats)
        sq = sum(float(m.double().pow(2).sum()) for m in mats)
        scores.append(1.0 - (l1 / n) / (sq / n) ** 0.5 if sq > 0 else 1.0)
    return torch.tensor(scores, dtype=torch.float64)


@register("mone", "expert", comparable=False)
def mone(profile: Profile, layer: MoELayer, **_) -> torch.Tensor:
    """MoNE's expert score: mean routing weight over all tokens times the spread of the expert's output.

    As the authors' `expert_prune_by_mone` (zxgx/mode-pd): φ_freq = Σ g / tokens (g: the weight the model
    applies, 0 where the expert is not picked) and φ_var = ‖√Var[y]‖₂ = √(Σ_d Var[y_d]), the unbiased variance of
    the ungated output over the expert's routed tokens, here exact from Σ‖y‖² and Σy: (Σ‖y‖² − ‖Σy‖²/n) / (n − 1)
    (theirs is a running estimate that skips its first batch). An expert with fewer than two routed tokens has
    no spread and scores 0. Their fusion weight multiplies both factors, so it never changes the ranking."""
    tokens = float(profile.get(layer.index, "tokens").reshape(()))
    count = profile.get(layer.index, "count").double()
    sq = profile.get(layer.index, "norm_sq_sum").double()
    total = profile.get(layer.index, "out_sum").double()
    var = (sq - total.pow(2).sum(1) / count.clamp(min=1)) / (count - 1).clamp(min=1)
    spread = torch.where(count > 1, var.clamp(min=0).sqrt(), torch.zeros_like(var))
    return profile.get(layer.index, "gate_sum").double() / max(tokens, 1.0) * spread
