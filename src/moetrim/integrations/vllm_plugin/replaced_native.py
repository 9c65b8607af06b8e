"""Replaced checkpoints served natively in vLLM: the memory the shared bases save is kept.

A replaced layer (replace, naive, merge, D²-MoE, MoNE novices; `moetrim.model.replaced`) stores kept experts
stacked, one base per group, rank-r factors per replaced expert and a constant output per novice. While the
plugin's model is built, such a layer's fused MoE is made with `routed_experts_cls=ReplacedRoutedExperts`:
the layer's stock runner (router, shared expert, reductions: vLLM's own) hands its top-k weights and ids to
moetrim's `ReplacedExperts` module, which holds exactly the stored tensors and runs each unit (kept expert
or group base) once per (token, unit) pair, the low-rank corrections batched per factor row, and novices
as a gathered constant. That call is the plugin's opaque custom op (as the grouped path's is).

A one-expert stock RoutedExperts of width ≤ 32 is kept per layer only for its kernel traits (what the
runner reads from `quant_method`); it is never run. Layers that cannot be served this way (tensor or expert
parallelism, quantisation, a non-SiLU activation, or MOETRIM_VLLM_REPLACED=reconstructed) fall back to the
labelled reconstruction in `replaced.py`, with a warning. vLLM is imported inside functions only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moetrim.integrations.vllm_plugin.grouped import PluginRoutedExperts, stock_experts, unsupported_reason
from moetrim.integrations.vllm_plugin.replaced import _STACKS
from moetrim.integrations.vllm_plugin.unpack import LayoutError
from moetrim.model.replaced import _FACTORS, ReplacedExperts
from moetrim.model.view import _GatedActivation

MODE_ENV = "MOETRIM_VLLM_REPLACED"  # "reconstructed": rebuild every replaced expert as stock weights (the fallback)
_STORED = (*_STACKS, *_FACTORS, "novice_out")
_TENSOR = re.compile(r"(?:^|\.)layers\.(?P<index>\d+)\.mlp\.experts\.(?P<what>" + "|".join(_STORED) + r")$")
_TRAITS_WIDTH = 32  # the trait donor's width: never run; the CPU kernel's smallest width (it pads to multiples of 32)


def requested_reconstruction() -> bool:
    """Whether $MOETRIM_VLLM_REPLACED asks for the reconstruction ("native" or unset: the native path); any
    other value stops in one line, rather than a typo silently serving the other way."""
    value = os.environ.get(MODE_ENV, "").strip().lower()
    if value not in ("", "native", "reconstructed"):
        raise LayoutError(f"{MODE_ENV}={os.environ[MODE_ENV]!r}: use 'native' (the default) or 'reconstructed'")
    return value == "reconstructed"


def native_reason(kwargs: dict, spec: Mapping) -> str | None:
    """Why a replaced layer's FusedMoEFactory call cannot be served natively (None: it can)."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    reason = unsupported_reason(kwargs)
    if reason:
        return reason
    if kwargs.get("quant_config") is not None:
        return "a quantised model"
    if str(kwargs.get("activation", "silu")).lower() != "silu" or kwargs.get("has_bias"):
        return f"experts with activation {kwargs.get('activation')!r} or biases"
    tp = kwargs.get("tp_size") or get_tensor_model_parallel_world_size()
    if tp != 1 or (kwargs.get("dp_size") or 1) != 1:
        return "tensor or data parallelism (the replaced module holds whole experts)"
    return None


class ReplacedRoutedExperts(PluginRoutedExperts):
    """Stands in for a replaced layer runner's `RoutedExperts`: moetrim's ReplacedExperts on vLLM's routing."""

    def __init__(self, layer_name, params_dtype, moe_config, quant_config, expert_map_manager, *,
                 moetrim_spec: Mapping, moetrim_hidden: int, moetrim_traits: nn.Module, **_routing_args):
        super().__init__(layer_name, params_dtype, moe_config, quant_config, expert_map_manager, moetrim_hidden,
                         lambda: self.traits, is_monolithic=False)
        self.traits = moetrim_traits
        self.experts = ReplacedExperts(int(moetrim_spec["num_experts"]), moetrim_hidden, int(moetrim_spec["width"]),
                                       moetrim_spec["kept"], moetrim_spec["groups"], int(moetrim_spec["rank"]),
                                       _GatedActivation(F.silu),
                                       novices=moetrim_spec.get("novices", ()), dtype=params_dtype)

    def _ensure_moe_quant_config_init(self):
        self.traits._ensure_moe_quant_config_init()

    def run(self, x, topk_weights, topk_ids):
        return self.experts(x, topk_ids.long(), topk_weights)


def build_replaced_native(stock_factory, kwargs: dict, spec: Mapping):
    """The layer's stock runner with a ReplacedRoutedExperts (and a small trait donor) for `spec`."""
    prefix = kwargs.get("prefix", "")
    traits = stock_experts(stock_factory, kwargs, 1, min(_TRAITS_WIDTH, int(spec["width"])), f"{prefix}.moetrim_traits")
    return stock_factory(**kwargs, routed_experts_cls=ReplacedRoutedExperts,
                         routed_experts_args={"moetrim_spec": spec, "moetrim_hidden": int(kwargs["hidden_size"]),
                                              "moetrim_traits": traits})


def load_native_weights(weights: Iterable[tuple[str, torch.Tensor]], modules: Mapping[int, tuple[str, ReplacedExperts]],
                        loaded: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass every tensor on except a natively served layer's stored experts, copied into its ReplacedExperts
    (qualified names added to `loaded`)."""
    for name, t in weights:
        m = _TENSOR.search(name)
        index = int(m["index"]) if m else None
        if index not in modules:
            yield name, t
            continue
        qual, experts = modules[index]
        param = getattr(experts, m["what"], None)
        if param is None or tuple(param.shape) != tuple(t.shape):
            raise LayoutError(f"{name}: shape {tuple(t.shape)}, but the layer's record needs "
                              f"{None if param is None else tuple(param.shape)}; restore the config.json moetrim wrote")
        with torch.no_grad():
            param.copy_(t.to(device=param.device, dtype=param.dtype))
        loaded.add(f"{qual}.{m['what']}")


def check_native_loaded(modules: Mapping[int, tuple[str, ReplacedExperts]], loaded: set[str]) -> None:
    missing = sorted(f"{qual}.{n}" for qual, experts in modules.values() for n, _ in experts.named_parameters()
                     if f"{qual}.{n}" not in loaded)
    if missing:
        raise LayoutError(f"the checkpoint lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}, which its "
                          "config.json's replaced record needs")
