"""One uniform view over the MoE layers of any `transformers` 5.x family with fused experts.

Everything above this module (calibration, criteria, planning, apply) speaks only to `MoELayer`
and `ExpertWeights`, so adding a family means teaching this file one more naming or layout rule.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from moetrim.errors import MoetrimError, UsageError

# Attribute names under which families keep the pieces of a sparse block.
_ROUTER_NAMES = ("gate", "router")
_EXPERTS_NAMES = ("experts",)
# Config keys that hold the routed-expert count / width, canonical names first.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size", "expert_intermediate_size", "expert_ffn_hidden_size")
SHARED_COUNT_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k")


@dataclass
class ExpertWeights:
    """One expert's tensors in canonical orientation (views into the module's storage where possible).

    gate, up: [I, H] (gate is None for ungated experts); down: [H, I]; biases optional.
    Dimension j of the expert is gate[j], up[j] and down[:, j].
    """

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return int(self.up.shape[0])


def _is_varwidth(experts: nn.Module) -> bool:
    return getattr(experts, "is_moetrim_varwidth", False)


def _is_replaced(experts: nn.Module) -> bool:
    return getattr(experts, "is_moetrim_replaced", False)


def _is_moetrim(experts: nn.Module) -> bool:
    """One of moetrim's own experts modules (variable-width or replaced): they share a small interface
    (num_experts, hidden_dim, widths, activation, expert_weights) instead of the stock tensors."""
    return _is_varwidth(experts) or _is_replaced(experts)


def _is_fused_stock(experts: nn.Module) -> bool:
    """A `transformers` experts module on the shared dispatch (decorated by use_experts_implementation)."""
    down = getattr(experts, "down_proj", None)
    return (
        isinstance(down, torch.Tensor)
        and down.ndim == 3
        and hasattr(experts, "is_transposed")
        and hasattr(experts, "has_gate")
    )


def stock_expert_weights(experts: nn.Module, e: int) -> ExpertWeights:
    """Canonical views of expert `e` of a stock fused experts module, whatever its layout flags."""
    transposed = bool(getattr(experts, "is_transposed", False))
    concatenated = bool(getattr(experts, "is_concatenated", True))
    has_gate = bool(getattr(experts, "has_gate", True))
    has_bias = bool(getattr(experts, "has_bias", False))
    down = experts.down_proj[e]
    down = down.t() if transposed else down  # -> [H, I]
    gate_bias = up_bias = down_bias = None
    if has_gate:
        gu = experts.gate_up_proj[e]
        gu = gu.t() if transposed else gu  # -> [2I, H]
        if concatenated:
            width = gu.shape[0] // 2
            gate, up = gu[:width], gu[width:]
        else:
            gate, up = gu[0::2], gu[1::2]
        if has_bias:
            b = experts.gate_up_proj_bias[e]
            if concatenated:
                gate_bias, up_bias = b[: b.shape[0] // 2], b[b.shape[0] // 2 :]
            else:
                gate_bias, up_bias = b[0::2], b[1::2]
    else:
        gate = None
        up = experts.up_proj[e]
        up = up.t() if transposed else up
        if has_bias:
            up_bias = experts.up_proj_bias[e]
    if has_bias:
        down_bias = experts.down_proj_bias[e]
    return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias)


def make_activation(experts: nn.Module) -> Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]:
    """The expert's elementwise function h(gate_pre, up_pre) in canonical (de-interleaved) form.

    Families with their own `_apply_gate` (GPT-OSS's clamped SwiGLU) are called through it with the
    layout it expects, so any family-specific activation is reproduced exactly without copying it.
    """
    if _is_moetrim(experts):
        return experts.activation
    has_gate = bool(getattr(experts, "has_gate", True))
    act_fn = getattr(experts, "act_fn", None)
    if not has_gate:
        return lambda gate, up: act_fn(up)
    from transformers.integrations import moe as hf_moe

    apply_gate = type(experts)._apply_gate
    if apply_gate is hf_moe._default_apply_gate:
        return _GatedActivation(act_fn)
    concatenated = bool(getattr(experts, "is_concatenated", True))
    shim = _GateShim(experts)

    def custom(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if concatenated:
            gu = torch.cat([gate, up], dim=-1)
        else:
            gu = torch.stack([gate, up], dim=-1).flatten(-2)
        return apply_gate(shim, gu)

    return custom


class _GatedActivation:
    """act(gate) * up. Calls the activation module's ``forward`` directly (the module call's hook
    machinery costs microseconds per expert at decode sizes) and multiplies in place when no gradient
    is recorded."""

    def __init__(self, act_fn: Callable[[torch.Tensor], torch.Tensor]):
        self._act = getattr(act_fn, "forward", act_fn)
        # SiLU (most families): the training backward uses its closed-form derivative (see varwidth_grad)
        self.silu = act_fn is torch.nn.functional.silu or type(act_fn).__name__ in ("SiLU", "SiLUActivation")

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._act(gate) * up
        h = self._act(gate)
        return h.mul_(up) if h.data_ptr() != gate.data_ptr() else h * up


class _GateShim:
    """Carries the scalar attributes (alpha, limit, act_fn...) a family's `_apply_gate` reads."""

    def __init__(self, experts: nn.Module):
        for key, value in vars(experts).items():
            if key.startswith("_"):
                continue
            if isinstance(value, (int, float, bool, str)) or callable(value) and not isinstance(value, nn.Parameter):
                setattr(self, key, value)
        act = getattr(experts, "act_fn", None)
        if act is not None:
            self.act_fn = act


@functools.lru_cache(maxsize=None)
def _routes_with_sigmoid(router_cls: type) -> bool:
    """Whether a router class scores experts with a sigmoid (DeepSeek-V3 style) rather than a softmax."""
    try:
        src = inspect.getsource(router_cls.forward)
    except (OSError, TypeError):
        return False
    return "sigmoid" in src


def _experts_shape(experts: nn.Module) -> tuple[int, int]:
    """(num_experts, hidden_size) of an experts module."""
    if _is_moetrim(experts):
        return experts.num_experts, experts.hidden_dim
    down = experts.down_proj
    transposed = bool(getattr(experts, "is_transposed", False))
    return int(down.shape[0]), int(down.shape[2] if transposed else down.shape[1])


@dataclass
class MoELayer:
    """A sparse MoE block of one decoder layer, seen through one interface."""

    index: int  # decoder layer index
    prefix: str  # module path of the sparse block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: list[tuple[str, nn.Module]]  # every other child of the block (shared experts, their gates)
    router_weight_name: str = "weight"  # path of the [E, H] logits weight inside the router

    @property
    def router_weight(self) -> torch.Tensor:
        return self.router.get_parameter(self.router_weight_name)

    @property
    def num_experts(self) -> int:
        return int(self.router_weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.router_weight.shape[1])

    def expert_indexed_tensors(self) -> list[tuple[nn.Module, str, int]]:
        """(module, attribute, axis) of every tensor indexed by expert outside the experts module:
        the router weight and bias, correction biases ([E] or [1, E]), expert-bias buffers."""
        E = self.num_experts
        found: list[tuple[nn.Module, str, int]] = []
        for module in [*self.router.modules(), self.block]:
            for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if t is None:
                    continue
                if t.ndim == 1 and t.shape[0] == E:
                    found.append((module, name, 0))
                elif t.ndim == 2 and t.shape[0] == E and t.shape[1] == self.hidden_size:
                    found.append((module, name, 0))
                elif t.ndim == 2 and t.shape[0] == 1 and t.shape[1] == E:
                    found.append((module, name, 1))
        return found

    @property
    def top_k(self) -> int:
        return int(getattr(self.router, "top_k"))

    @property
    def widths(self) -> list[int]:
        if _is_moetrim(self.experts):
            return list(self.experts.widths)
        return [self.expert(0).width] * self.num_experts

    @property
    def has_bias(self) -> bool:
        return bool(getattr(self.experts, "has_bias", False))

    @property
    def gated(self) -> bool:
        return bool(getattr(self.experts, "has_gate", True))

    @property
    def routing(self) -> str:
        """How router logits become probabilities: 'sigmoid' for DeepSeek-V3-style routers, else 'softmax'."""
        return "sigmoid" if _routes_with_sigmoid(type(self.router)) else "softmax"

    @property
    def num_groups(self) -> int:
        """Expert groups of a group-limited router (DeepSeek); 1 when routing is not grouped."""
        groups = getattr(self.router, "num_group", None)
        method = getattr(self.router, "topk_method", None)
        if groups is None or (method is not None and method == "greedy"):
            return 1
        return int(groups)

    def expert(self, e: int) -> ExpertWeights:
        if _is_moetrim(self.experts):
            return self.experts.expert_weights(e)
        return stock_expert_weights(self.experts, e)

    def activation(self) -> Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]:
        return make_activation(self.experts)

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits.sigmoid() if self.routing == "sigmoid" else logits.softmax(dim=-1)

    def params_per_dim(self) -> int:
        """Parameters that one intermediate dimension costs: gate row, up row, down column, biases."""
        h = self.hidden_size
        per = (3 if self.gated else 2) * h
        if self.has_bias:
            per += 2 if self.gated else 1
        return per

    def params_per_expert_fixed(self) -> int:
        """Parameters an expert has independent of its width (its down bias)."""
        return self.hidden_size if self.has_bias else 0

    def params_at(self, widths) -> int:
        """Routed-expert parameters of this layer with its kept experts at these widths."""
        return sum(int(w) * self.params_per_dim() + self.params_per_expert_fixed() for w in widths)

    def routed_params(self) -> int:
        """Parameters actually stored in the routed experts module (not the router)."""
        return sum(p.numel() for p in self.experts.parameters())


def require_uniform_widths(layers: list[MoELayer], doing: str) -> None:
    """UsageError for a model already trimmed to different widths, or rerouted by fine-tuning (a router
    bias, condenser experts): every compression method starts from a model with stock routing."""
    if any(len(set(l.widths)) != 1 for l in layers):
        raise UsageError(f"this model is already compressed to different widths; {doing} the original model")
    if any(_is_replaced(l.experts) for l in layers):
        raise UsageError(f"this model's experts are already replaced by shared bases and low-rank corrections; {doing} the original model")
    if any(hasattr(l.router, "moetrim_bias") or hasattr(l.router, "moetrim_condensers") for l in layers):
        raise UsageError(f"this model was fine-tuned with a router bias or condenser experts; {doing} the model before "
                         "fine-tuning (compress first, then fine-tune the compressed model)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers: the longest ModuleList named '*layers' (works for every CausalLM)."""
    best: nn.ModuleList | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise MoetrimError(f"cannot find decoder layers in {type(model).__name__}: no ModuleList named 'layers'")
    return best


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block of the model, in layer order; dense layers in between are skipped.

    Raises a MoetrimError naming what was found when the model has no MoE layer on the fused
    experts dispatch (a dense model, or an experts layout moetrim does not know).
    """
    layers = decoder_layers(model)
    prefix_of = {id(m): n for n, m in model.named_modules()}
    found: list[MoELayer] = []
    unknown: list[str] = []
    for i, layer in enumerate(layers):
        for _, block in layer.named_children():
            experts = next((getattr(block, n) for n in _EXPERTS_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
            if experts is None:
                continue
            if not (_is_moetrim(experts) or _is_fused_stock(experts)):
                unknown.append(f"layer {i}: {type(block).__name__}.experts is {type(experts).__name__}")
                continue
            n_exp, hidden = _experts_shape(experts)
            router, weight_name = None, None
            for rname in _ROUTER_NAMES:
                cand = getattr(block, rname, None)
                if not isinstance(cand, nn.Module) or cand is experts:
                    continue
                weight_name = next(
                    (n for n, p in cand.named_parameters() if p.ndim == 2 and tuple(p.shape) == (n_exp, hidden)), None
                )
                if weight_name is not None:
                    router = cand
                    break
            if router is None:
                unknown.append(f"layer {i}: {type(block).__name__} has experts but no router with a [{n_exp}, {hidden}] weight")
                continue
            if not hasattr(router, "top_k"):
                unknown.append(f"layer {i}: router {type(router).__name__} has no top_k")
                continue
            shared = [(n, m) for n, m in block.named_children() if m is not experts and m is not router]
            found.append(MoELayer(i, prefix_of[id(block)], block, router, experts, shared, weight_name))
            break
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        if unknown:
            raise MoetrimError(f"unsupported MoE layout in {model_type}: " + "; ".join(unknown[:3]))
        mlp_types = sorted({type(getattr(l, "mlp", None)).__name__ for l in layers if hasattr(l, "mlp")})
        raise MoetrimError(
            f"{model_type} has no MoE layers (decoder layers hold {', '.join(mlp_types) or 'no mlp'}); "
            "moetrim compresses Mixture-of-Experts models"
        )
    return found


def routed_expert_param_count(model: nn.Module) -> int:
    """Parameters in routed experts over all MoE layers (what `--ratio` is a fraction of)."""
    return sum(layer.routed_params() for layer in find_moe_layers(model))


def resize_expert_tensors(layer: MoELayer, keep: list[int] | None, n: int) -> None:
    """Give every expert-indexed tensor around the router (its weight, biases, correction biases,
    expert-bias buffers) `n` experts: the rows `keep`, or (keep=None) empty meta tensors to load into."""
    old = layer.num_experts
    for module, name, axis in layer.expert_indexed_tensors():
        t = getattr(module, name)
        if keep is not None:
            new = t.detach().index_select(axis, torch.tensor(keep, dtype=torch.long, device=t.device)).clone()
        else:
            shape = list(t.shape)
            shape[axis] = n
            new = torch.empty(shape, dtype=t.dtype, device="meta")
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)
    for m in [*layer.router.modules(), layer.block]:
        if getattr(m, "num_experts", None) == old:
            m.num_experts = n
