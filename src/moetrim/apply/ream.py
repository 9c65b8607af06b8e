"""Building a REAM plan: each group merged into its centroid, the other experts and their router rows removed.

As REAM's `Merger._merge` ('logits+weights', SamsungSAILMontreal/ream `merger.py`): every member's
intermediate neurons are first matched to its centroid's by the Hungarian algorithm, then the group's
gate, up and down are averaged with weights S_e / Σ S (the plan's base_weights, REAM's saliency). The
matching cost between centroid neuron a and member neuron b is ‖ŵ_c[a] − ŵ_j[b]‖, ŵ a neuron's
[gate row ‖ up row ‖ down column], normalised, projected on the layer's top 64 principal directions (fitted
on all its experts' neurons together), each scaled by its singular value as REAM's `pca_reduce` does, and
normalised again. Where ours differs: REAM adds the distance between the two neurons' normalised
activations, which their code samples on different tokens for every expert; ours matches on weights
alone. Their PCA is torch's randomised `pca_lowrank` (2 power iterations); ours is exact, so on a flat
spectrum (the bundled models) the two bases, and so the matchings, differ
(`scripts/check_ream_against_authors.py`). The result is a standard checkpoint: the router keeps only the
centroids' rows and every layer keeps its top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrim.errors import UsageError
from moetrim.model.view import MoELayer, find_moe_layers

PCA_DIM = 64  # REAM's pca_reduce dimension


def neuron_features(layer: MoELayer) -> torch.Tensor:
    """[E, I, d] the layer's neurons as REAM matches them: [gate_n ‖ up_n ‖ down[:, n]] normalised, reduced to
    the top `PCA_DIM` principal components of all E·I neurons (when wider; coordinates × singular value)
    and normalised again."""
    rows = []
    for e in range(layer.num_experts):
        w = layer.expert(e)
        parts = [w.gate.detach().double(), w.up.detach().double(), w.down.detach().double().T]
        rows.append(torch.cat([p for p in parts if p is not None], dim=1))
    x = torch.nn.functional.normalize(torch.stack(rows), dim=-1)  # [E, I, F]
    E, I, F = x.shape
    if F > PCA_DIM:
        flat = x.reshape(E * I, F)
        centred = flat - flat.mean(0)
        vals, vecs = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues: the squared singular values
        top = vecs[:, -PCA_DIM:].flip(1) * vals[-PCA_DIM:].flip(0).clamp(min=0).sqrt()  # V·diag(s), as REAM scales
        x = (centred @ top).reshape(E, I, PCA_DIM)
    return torch.nn.functional.normalize(x, dim=-1)


def match(centroid: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """perm [I] with member neuron perm[a] matched to centroid neuron a (a minimum-cost assignment)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(centroid, member).numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def merged_group(layer: MoELayer, group: list[int], weights: list[float], feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(gate [I, H], up [I, H], down [H, I]) of the group merged into its centroid group[0], in float64."""
    total = sum(weights)
    omega = [w / total for w in weights] if total > 0 else [1 / len(group)] * len(group)
    c = group[0]
    gate = up = down = None
    for e, w in zip(group, omega):
        perm = torch.arange(layer.widths[0]) if e == c else match(feats[c], feats[e])
        ew = layer.expert(e)
        g, u, d = ew.gate.detach().double()[perm], ew.up.detach().double()[perm], ew.down.detach().double()[:, perm]
        gate, up, down = (g * w, u * w, d * w) if gate is None else (gate + g * w, up + u * w, down + d * w)
    return gate, up, down


def apply_ream_plan(model: nn.Module, plan) -> nn.Module:
    """Merge every planned group into its centroid and slice the model to the centroids (in place; the
    model's original tensors are read, never written, as every apply)."""
    from moetrim.apply.slicing import apply_plan as apply_sliced
    from moetrim.plan.schema import LayerPlan, Plan

    layers = {l.index: l for l in find_moe_layers(model)}
    merged: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
    sliced = []
    for lp in plan.layers:
        layer = layers.get(lp.layer)
        if layer is None or layer.num_experts != lp.experts_before:
            raise UsageError(f"plan layer {lp.layer} does not match the model's MoE layers")
        feats = neuron_features(layer)
        merged[lp.layer] = {g[0]: merged_group(layer, g, [float(lp.base_weights[str(e)]) for e in g], feats)
                            for g in lp.groups if len(g) > 1}
        kept = sorted(g[0] for g in lp.groups)
        sliced.append(LayerPlan(lp.layer, lp.experts_before, lp.width, min(lp.top_k, len(kept)), kept, [lp.width] * len(kept), None))
    slicing = Plan("experts", "ream", plan.ratio, "layer", plan.seed, None, 1, 0, None, plan.model_fingerprint, plan.profile_digest,
                   plan.params_before, plan.params_after, sliced)
    apply_sliced(model, slicing)
    layers = {l.index: l for l in find_moe_layers(model)}
    with torch.no_grad():
        for lp, sp in zip(plan.layers, sliced):
            for c, (gate, up, down) in merged[lp.layer].items():
                w = layers[lp.layer].expert(sp.kept_experts.index(c))  # views into the new, sliced tensors
                for dst, src in ((w.gate, gate), (w.up, up), (w.down, down)):
                    dst.copy_(src.to(dst.dtype))
    return model
