"""Dimension-level criteria: one score per intermediate dimension j of each routed expert e, [E, I].

Removing dimension j removes gate row j, up row j and down column j; the expert's output changes
only by that dimension's contribution h_j · down[:, j].
"""

from __future__ import annotations

import torch

from moetrim.calibrate.profile import Profile
from moetrim.criteria import register
from moetrim.model.view import MoELayer


def _stat(profile: Profile, layer: MoELayer, name: str) -> torch.Tensor:
    return profile.get(layer.index, name).double()


@register("fisher", "dim", comparable=True, gradients=True)
def fisher(profile: Profile, layer: MoELayer, **_) -> torch.Tensor:
    """Empirical Fisher of a mask on the dimension: sum over sequences of (dL_s/dm)^2."""
    return _stat(profile, layer, "fisher")


@register("grad_magnitude", "dim", comparable=True, gradients=True)
def grad_magnitude(profile: Profile, layer: MoELayer, **_) -> torch.Tensor:
    """Mean over sequences of sum |dL_s/dW| over the gate row, up row and down column, / 3H."""
    n = max(profile.sequences, 1)
    return _stat(profile, layer, "grad_magnitude") / (n * 3 * layer.hidden_size)


@register("taylor", "dim", comparable=True, gradients=True)
def taylor(profile: Profile, layer: MoELayer, **_) -> torch.Tensor:
    """First-order Taylor: |sum dL/dm|, the loss change of removing the dimension to first order."""
    return _stat(profile, layer, "taylor").abs()


@register("activation", "dim", comparable=False)
def activation(profile: Profile, layer: MoELayer, **_) -> torch.Tensor:
    """Sum of |h| over routed tokens."""
    return _stat(profile, layer, "act_abs_sum")


@register("max_activation", "dim", comparable=False)
def max_activation(profile: Profile, layer: MoELayer, **_) -> torch.Tensor:
    """Largest |h| seen: keeps rare but extreme ('super') dimensions."""
    return _stat(profile, layer, "act_abs_max")


@register("router_weighted", "dim", comparable=False)
def router_weighted(profile: Profile, layer: MoELayer, **_) -> torch.Tensor:
    """Sum of g*|h|: activation weighted by the routing weight the model applies."""
    return _stat(profile, layer, "gated_act_abs_sum")


def _down_column_norms(layer: MoELayer) -> torch.Tensor:
    return torch.stack([layer.expert(e).down.detach().float().norm(dim=0).double().cpu() for e in range(layer.num_experts)])


@register("output_aware", "dim", comparable=False, weights=True)
def output_aware(profile: Profile, layer: MoELayer, **_) -> torch.Tensor:
    """||h||_2 over tokens times ||down[:, j]||_2: the size of what the dimension adds to the output."""
    return _stat(profile, layer, "act_sq_sum").sqrt() * _down_column_norms(layer)


@register("magnitude", "dim", comparable=False, weights=True, profile=False)
def magnitude(profile: Profile | None, layer: MoELayer, **_) -> torch.Tensor:
    """Weights only: ||gate_j|| * ||up_j|| * ||down[:, j]|| (the path norm of the dimension)."""
    rows = []
    for e in range(layer.num_experts):
        w = layer.expert(e)
        score = w.up.detach().float().norm(dim=1) * w.down.detach().float().norm(dim=0)
        if w.gate is not None:
            score = score * w.gate.detach().float().norm(dim=1)
        rows.append(score.double().cpu())
    return torch.stack(rows)


@register("random", "dim", comparable=True, profile=False)
def random_dims(profile: Profile | None, layer: MoELayer, *, seed: int = 0, **_) -> torch.Tensor:
    """Uniform random scores (a baseline), seeded per layer."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer.index)
    return torch.rand(layer.num_experts, layer.widths[0], generator=gen, dtype=torch.float64)


# CAMERA-P's weight between the energy and the peak of a micro-expert's gated activation (the authors' run.sh: 0.90).
CAMERA_ALPHA = 0.9


@register("camera", "dim", comparable=False, weights=True, allocation="layer", min_width=0)
def camera(profile: Profile, layer: MoELayer, *, alpha: float = CAMERA_ALPHA, **_) -> torch.Tensor:
    """CAMERA-P's micro-expert energy: ‖down[:, j]‖² · ((1 − α) Σ (g·h_j)² + α max (g·h_j)²), α = 0.9.

    As the authors' `MEI.est_importance` (xuyuzhuang11/CAMERA `mei.py`): g is the routing weight the model
    applies, h_j the dimension's activation, over the tokens routed to the expert; their allocation is the same
    ratio in every layer with the layer's micro-experts ranked jointly and no floor on an expert's width, which
    is this criterion's default (`--allocation layer`, `--min-width 0`). Where ours differs: an expert losing
    every dimension is removed with its router row (theirs zeroes it and the router can still pick it, spending
    a top-k slot on nothing), and the remaining dimensions become smaller tensors rather than zeroed rows."""
    energy = _stat(profile, layer, "gated_act_sq_sum")
    peak = _stat(profile, layer, "gated_act_abs_max").pow(2)
    return _down_column_norms(layer).pow(2) * ((1 - alpha) * energy + alpha * peak)
