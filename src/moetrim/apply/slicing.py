"""Plan -> real smaller tensors. Removed experts lose their router rows; removed dimensions their
gate/up rows and down columns. Nothing is masked or zero-padded.

Two outcomes:
- standard: every MoE layer keeps the same expert count and every expert one width. The stock
  experts tensors are sliced and the config edited; the result is exactly what plain
  `transformers` builds from the new config (checked on a meta-device model, never assumed).
- variable-width: otherwise (or when the config cannot express the result, e.g. a shared expert
  whose width is tied to the expert width), experts become `VariableWidthExperts` and the config
  records the per-layer widths for `moetrim.load`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from moetrim.errors import MoetrimError, UsageError
from moetrim.model.identity import model_fingerprint
from moetrim.model.varwidth import VARWIDTH_KEY, VariableWidthExperts
from moetrim.model.view import (
    EXPERT_COUNT_KEYS,
    EXPERT_WIDTH_KEYS,
    SHARED_COUNT_KEYS,
    TOP_K_KEYS,
    MoELayer,
    find_moe_layers,
    make_activation,
    require_uniform_widths,
    resize_expert_tensors,
)
from moetrim.plan import LayerPlan, Plan
from moetrim.plan.schema import check_plan, keeps_every_expert_whole


@dataclass
class ApplyResult:
    format: str  # "standard", "varwidth" (or "replaced", from moetrim.apply.apply_plan)
    note: str = ""


def apply_plan(model: nn.Module, plan: Plan, *, check_fingerprint: bool = True, force_varwidth: bool = False,
               profile=None) -> ApplyResult:
    """Compress `model` in place according to `plan` (torchao-style: one verb, model changed).

    New tensors are allocated for everything that changes; tensors of `model` are never written
    in place, so a shallow copy sharing them with another model is safe to compress.
    force_varwidth: use the variable-width experts even where a standard checkpoint is possible.
    An auto plan's replaced layers (novices, merged or replaced groups) are built from the layers' own
    weights before anything is sliced; `profile` gives novices' outputs and whitening Grams."""
    from moetrim.apply.replace import build_planned_layer
    from moetrim.model.replaced import install_layer

    job = prepare_apply(model, plan, check_fingerprint=check_fingerprint, force_varwidth=force_varwidth, streaming=False)
    replaced = {r.layer: r for r in plan.replaced_layers or []}
    built = {l.index: build_planned_layer(l, replaced[l.index], profile, plan.seed) for l in job.layers if l.index in replaced}
    sliced = [l for l in job.layers if l.index not in replaced]
    if replaced and all(keeps_every_expert_whole(p.kept_experts, p.experts_before, p.widths, p.width_before)
                        for p in (job.by_index[l.index] for l in sliced)):
        result = ApplyResult("replaced")  # nothing is sliced: a model with replaced layers and stock ones
    else:
        for layer in sliced:
            apply_layer(job, layer)
        result = finish_apply(model, job)
    for layer in job.layers:
        if layer.index in built:
            install_layer(model, layer, built[layer.index])
    return result


@dataclass
class ApplyJob:
    """What applying a plan to a model will do, decided from shapes and routers only (no expert
    weights read): the streaming path (moetrim.apply.streaming) applies it one layer at a time."""

    plan: Plan
    layers: list[MoELayer]
    by_index: dict[int, LayerPlan]
    config: object | None  # the standard config, or None for the variable-width format
    note: str = ""


def prepare_apply(model: nn.Module, plan: Plan, *, check_fingerprint: bool = True, force_varwidth: bool = False,
                  streaming: bool = True) -> ApplyJob:
    """Every check of a plan against a model, and the outcome's format; reads no expert weight.
    streaming: the caller slices layer by layer from disk, which an auto plan with replaced layers cannot use."""
    layers = find_moe_layers(model)
    require_uniform_widths(layers, "apply plans to")
    check_plan(plan)  # a Plan built or edited in Python gets the checks a plan file gets
    if check_fingerprint and plan.model_fingerprint != model_fingerprint(model):
        raise UsageError("the plan was made for another model (model fingerprints differ)")
    by_index = {p.layer: p for p in plan.layers}
    if sorted(by_index) != [l.index for l in layers]:
        raise UsageError(f"the plan covers layers {sorted(by_index)} but the model's MoE layers are {[l.index for l in layers]}")
    for layer in layers:
        _check_layer_plan(layer, by_index[layer.index])
    replaced = {r.layer: r for r in plan.replaced_layers or []}
    if replaced and streaming:
        raise UsageError(f"this auto plan replaces the experts of layers {sorted(replaced)} (novices, merged or replaced groups), "
                         "which are built from whole layers in memory: apply it without --streaming")
    before = sum(l.routed_params() for l in layers)
    after = sum(l.params_at(by_index[l.index].widths) for l in layers if l.index not in replaced)
    if replaced:
        from moetrim.plan.replace import stored_params

        for l in layers:
            if l.index in replaced:
                if (l.num_experts, l.widths[0], l.top_k) != (replaced[l.index].experts_before, replaced[l.index].width, replaced[l.index].top_k):
                    raise UsageError(f"replaced layer {l.index} of the plan does not match the model's layer (experts, width or top-k)")
                after += stored_params(l, replaced[l.index])
    if (plan.params_before, plan.params_after) != (before, after):
        raise UsageError(f"the plan's params_before/params_after ({plan.params_before}, {plan.params_after}) are not what its widths "
                         f"give on this model ({before}, {after}); was it edited? fix them or re-run `moetrim plan`")
    counts = {len(p.kept_experts) for p in plan.layers}
    widths = {w for p in plan.layers for w in p.widths}
    if len(counts) == 1 and len(widths) == 1 and not force_varwidth and not replaced:
        config = _standard_config(model, layers, counts.pop(), widths.pop(), min(p.top_k for p in plan.layers))
        if config is not None:
            return ApplyJob(plan, layers, by_index, config)
        return ApplyJob(plan, layers, by_index, None,
                        "the config cannot express this width without changing the shared expert; saved in moetrim's variable-width format")
    return ApplyJob(plan, layers, by_index, None)


def apply_layer(job: ApplyJob, layer: MoELayer) -> None:
    """Apply the plan to one MoE layer (its weights must be in memory)."""
    if job.config is not None:
        _slice_stock(layer, job.by_index[layer.index])
    else:
        _to_varwidth(layer, job.by_index[layer.index])


def finish_apply(model: nn.Module, job: ApplyJob) -> ApplyResult:
    """The model's new config once every layer is applied (shapes only: the layers may be back on meta)."""
    if job.config is not None:
        model.config = job.config
        _propagate_config(model, job.config)
        _verify_against_config(model)
        return ApplyResult("standard")
    setattr(model.config, VARWIDTH_KEY, varwidth_record(job.plan))
    return ApplyResult("varwidth", job.note)


def varwidth_record(plan: Plan) -> dict:
    """The config's record of a variable-width model: each layer's expert widths, count and top-k."""
    replaced = {r.layer for r in plan.replaced_layers or []}  # their record is the replaced one (moetrim.model.replaced)
    layers = {str(p.layer): {"widths": p.widths, "top_k": p.top_k, "num_experts": len(p.kept_experts)}
              for p in plan.layers if p.layer not in replaced}
    # version 2: blocks stored sorted by width ("by_width"); version 1 files have no layout and are by expert
    return {"version": 2, "layout": "by_width", "layers": layers}


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose modules are new but whose tensors are shared with it.

    `apply_plan` never writes tensors in place, so the copy can be compressed while the original
    stays intact, at the memory cost of the compressed tensors only: try many plans on one load."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _check_layer_plan(layer: MoELayer, p: LayerPlan) -> None:
    """The plan's own consistency is `check_plan`'s; this is its agreement with the model's layer."""
    if p.experts_before != layer.num_experts or p.width_before != layer.widths[0]:
        raise UsageError(f"plan does not match layer {layer.index}: it expects {p.experts_before} experts of width {p.width_before}, "
                         f"the model has {layer.num_experts} of width {layer.widths[0]}")
    if p.top_k > layer.top_k:
        raise UsageError(f"plan layer {layer.index}: top_k {p.top_k} is more than the model's {layer.top_k}")
    G = layer.num_groups
    if G > 1:
        per = layer.num_experts // G
        kept_per_group = [sum(1 for e in p.kept_experts if e // per == g) for g in range(G)]
        if len(set(kept_per_group)) != 1:
            raise UsageError(f"plan layer {layer.index}: a grouped router needs the same number of experts kept in each of its {G} groups")


def _dims(p: LayerPlan, width: int) -> list[torch.Tensor]:
    if p.kept_dims is None:
        return [torch.arange(width) for _ in p.kept_experts]
    return [torch.tensor(d, dtype=torch.long) for d in p.kept_dims]


# -- router ---------------------------------------------------------------------------------
def _slice_router(layer: MoELayer, p: LayerPlan) -> None:
    resize_expert_tensors(layer, p.kept_experts, len(p.kept_experts))
    layer.router.top_k = p.top_k
    if hasattr(layer.block, "top_k"):
        layer.block.top_k = p.top_k


# -- standard path --------------------------------------------------------------------------
def _gate_up_positions(dims: torch.Tensor, width: int, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack([2 * dims, 2 * dims + 1], dim=1).flatten()
    return torch.cat([dims, dims + width])


def _slice_stock(layer: MoELayer, p: LayerPlan) -> None:
    experts = layer.experts
    width = layer.widths[0]
    transposed = bool(getattr(experts, "is_transposed", False))
    interleaved = not bool(getattr(experts, "is_concatenated", True))
    gated = bool(getattr(experts, "has_gate", True))
    dims = _dims(p, width)
    keep = p.kept_experts

    def take(t: torch.Tensor, positions: list[torch.Tensor] | None, axis_of_dims: int | None) -> torch.Tensor:
        """The kept experts' slices of t, gathered straight into the new tensor (one copy of what is kept,
        no per-expert temporaries: at Mixtral's layer that halved the time and the peak memory)."""
        shape = list(t.shape[1:])
        if positions is not None:
            shape[axis_of_dims] = len(positions[0])
        out = t.new_empty((len(keep), *shape))
        for i, (e, pos) in enumerate(zip(keep, positions or [None] * len(keep))):
            if pos is None:
                out[i].copy_(t[e])
            else:
                torch.index_select(t[e], axis_of_dims, pos.to(t.device), out=out[i])
        return out

    in_name = "gate_up_proj" if gated else "up_proj"
    in_pos = [_gate_up_positions(d, width, interleaved) for d in dims] if gated else dims
    with torch.no_grad():
        w_in = getattr(experts, in_name)
        setattr(experts, in_name, nn.Parameter(take(w_in, in_pos, 1 if transposed else 0), requires_grad=w_in.requires_grad))
        w_out = experts.down_proj
        experts.down_proj = nn.Parameter(take(w_out, dims, 0 if transposed else 1), requires_grad=w_out.requires_grad)
        if getattr(experts, "has_bias", False):
            b_in = getattr(experts, in_name + "_bias")
            setattr(experts, in_name + "_bias", nn.Parameter(take(b_in, in_pos, 0), requires_grad=b_in.requires_grad))
            b_out = experts.down_proj_bias
            experts.down_proj_bias = nn.Parameter(take(b_out, None, None), requires_grad=b_out.requires_grad)
    new_width = p.widths[0]
    for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):
        if getattr(experts, attr, None) == width:
            setattr(experts, attr, new_width)
    experts.num_experts = len(keep)
    _slice_router(layer, p)


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_shapes(model: nn.Module, config) -> dict[str, tuple] | None:
    try:
        with torch.device("meta"):
            ref = type(model)(config)
    except Exception:
        return None
    return _shapes(ref)


def _expected_shapes(model: nn.Module, layers: list[MoELayer], n_experts: int, width: int) -> dict[str, tuple]:
    """State-dict shapes the model will have once sliced (computed without slicing)."""
    shapes = _shapes(model)
    for layer in layers:
        experts = layer.experts
        prefix = next(n for n, m in model.named_modules() if m is experts)
        transposed = bool(getattr(experts, "is_transposed", False))
        for name, t in experts.named_parameters(recurse=False):
            s = list(t.shape)
            s[0] = n_experts
            old = layer.widths[0]
            if name in ("gate_up_proj", "up_proj"):
                axis = 2 if transposed else 1
                s[axis] = s[axis] // old * width
            elif name == "down_proj":
                s[1 if transposed else 2] = width
            elif name in ("gate_up_proj_bias", "up_proj_bias"):
                s[1] = s[1] // old * width
            shapes[f"{prefix}.{name}"] = tuple(s)
        names = {id(m): n for n, m in model.named_modules()}
        for module, name, axis in layer.expert_indexed_tensors():
            t = getattr(module, name)
            shape = list(t.shape)
            shape[axis] = n_experts
            shapes[f"{names[id(module)]}.{name}"] = tuple(shape)
    return shapes


def _standard_config(model: nn.Module, layers: list[MoELayer], n_experts: int, width: int, top_k: int):
    """A config that plain transformers turns into exactly the sliced model, or None."""
    cfg = model.config
    old_e, old_w = layers[0].num_experts, layers[0].widths[0]
    expected = _expected_shapes(model, layers, n_experts, width)
    base = copy.deepcopy(cfg)
    for key in EXPERT_COUNT_KEYS:
        if getattr(base, key, None) == old_e:
            setattr(base, key, n_experts)
    for key in TOP_K_KEYS:
        if isinstance(getattr(base, key, None), int) and getattr(base, key) > top_k:
            setattr(base, key, top_k)
    width_keys = [k for k in EXPERT_WIDTH_KEYS if getattr(base, k, None) == old_w]
    if width == old_w:
        width_keys = [None]
    for wkey in width_keys:
        for skey in (None, *SHARED_COUNT_KEYS):
            cand = copy.deepcopy(base)
            if wkey is not None:
                setattr(cand, wkey, width)
            if skey is not None:
                n_shared = getattr(cand, skey, None)
                if not isinstance(n_shared, int) or (n_shared * old_w) % width:
                    continue
                setattr(cand, skey, n_shared * old_w // width)
            if _meta_shapes(model, cand) == expected:
                return cand
    return None


def _propagate_config(model: nn.Module, config) -> None:
    for m in model.modules():
        if hasattr(m, "config") and m is not model:
            try:
                m.config = config
            except (AttributeError, TypeError):
                pass


def _verify_against_config(model: nn.Module) -> None:
    expected = _meta_shapes(model, model.config)
    if expected != _shapes(model):
        raise MoetrimError("internal error: the sliced model does not match what its new config builds")


# -- variable-width path --------------------------------------------------------------------
def _to_varwidth(layer: MoELayer, p: LayerPlan) -> None:
    if getattr(layer.experts, "has_post_expert_norm", False):
        raise UsageError(f"layer {layer.index}: experts with a post-expert norm are not supported for variable widths")
    width = layer.widths[0]
    source = [layer.expert(e) for e in p.kept_experts]
    new = VariableWidthExperts.from_weights(
        source, _dims(p, width), make_activation(layer.experts), gated=layer.gated, has_bias=layer.has_bias,
        layout="by_width",
    )
    new.requires_grad_(any(t.requires_grad for t in layer.experts.parameters()))
    name = next(n for n, c in layer.block.named_children() if c is layer.experts)
    setattr(layer.block, name, new)
    layer.experts = new
    _slice_router(layer, p)
