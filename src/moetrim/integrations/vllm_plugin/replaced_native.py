"""Replaced checkpoints served natively in vLLM: the memory the shared bases save is kept.

A replaced layer (replace, naive, merge, D²-MoE, MoNE novices; `moetrim.model.replaced`) stores kept experts
stacked, one base per group, rank-r factors per replaced expert and a constant output per novice. While the
plugin's model is built, such a layer's fused MoE is made with `routed_experts_cls=ReplacedRoutedExperts`:
the layer's stock runner (router, shared expert, reductions: vLLM's own) hands its top-k weights and ids to
it, and it sums two parts:

* the **kept experts in a stock fused MoE** of the family's own kernel (a RoutedExperts of K experts, made
  with the layer's kernel arguments), run on the slots routed to them as the grouped path runs a width
  group (`unpack.grouped_forward`: fixed shapes up to its sync-free bound, counted above it);
* everything else in moetrim's `ReplacedExperts` with the kept experts left out (`kept=False`): each group
  base once per (token, group) pair, the low-rank corrections batched per factor row, novices as a gathered
  constant. Its kept stacks are dropped; the kept tensors stream into the stock kernel's loader instead.

That call is the plugin's opaque custom op (as the grouped path's is). A layer with no kept expert (D²-MoE)
keeps a one-expert stock RoutedExperts of width ≤ 32 only for its kernel traits (what the runner reads from
`quant_method`); it is never run. Layers that cannot be served this way (tensor or expert parallelism,
quantisation, a non-SiLU activation, or MOETRIM_VLLM_REPLACED=reconstructed) fall back to the labelled
reconstruction in `replaced.py`, with a warning. vLLM is imported inside functions only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moetrim.integrations.vllm_plugin.grouped import PluginRoutedExperts, stock_experts, unsupported_reason
from moetrim.integrations.vllm_plugin.replaced import _STACKS
from moetrim.integrations.vllm_plugin.unpack import LayoutError, grouped_forward
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
    """Stands in for a replaced layer runner's `RoutedExperts`: the kept experts in a stock RoutedExperts
    (`kept_experts`), the rest in moetrim's ReplacedExperts (`experts`), both on vLLM's routing."""

    def __init__(self, layer_name, params_dtype, moe_config, quant_config, expert_map_manager, *,
                 moetrim_spec: Mapping, moetrim_hidden: int, moetrim_kept, moetrim_traits, **_routing_args):
        super().__init__(layer_name, params_dtype, moe_config, quant_config, expert_map_manager, moetrim_hidden,
                         lambda: self.kept_experts if self.kept_experts is not None else self.traits, is_monolithic=False)
        self.kept_experts, self.traits = moetrim_kept, moetrim_traits
        self.experts = ReplacedExperts(int(moetrim_spec["num_experts"]), moetrim_hidden, int(moetrim_spec["width"]),
                                       moetrim_spec["kept"], moetrim_spec["groups"], int(moetrim_spec["rank"]),
                                       _GatedActivation(F.silu),
                                       novices=moetrim_spec.get("novices", ()), dtype=params_dtype)
        kept = self.experts.kept
        self.experts.kept_gate_up, self.experts.kept_down = None, None  # held (once) by the stock kernel instead
        group_of, local_of = [1] * self.experts.num_experts, [0] * self.experts.num_experts
        for j, e in enumerate(kept):
            group_of[e], local_of[e] = 0, j
        self.register_buffer("group_of", torch.tensor(group_of, dtype=torch.long), persistent=False)
        self.register_buffer("local_of", torch.tensor(local_of, dtype=torch.long), persistent=False)
        self.rest = bool(self.experts.groups or self.experts.novices)

    def _ensure_moe_quant_config_init(self):
        (self.kept_experts if self.kept_experts is not None else self.traits)._ensure_moe_quant_config_init()

    def run(self, x, topk_weights, topk_ids):
        out = self.experts(x, topk_ids.long(), topk_weights, kept=False) if self.rest else torch.zeros_like(x)
        if self.kept_experts is None:
            return out
        if self.kept_experts.quant_method.is_monolithic:
            raise RuntimeError("moetrim: this vLLM's fused-MoE kernel routes internally (monolithic); replaced layers "
                               "need a modular kernel. Serve them reconstructed: MOETRIM_VLLM_REPLACED=reconstructed")

        def run(g: int, rows, weights, ids):  # group 0: the kept experts; group 1: the slots `experts` ran
            if g:
                return torch.zeros_like(rows)
            return self.kept_experts.forward_modular(x=rows, topk_weights=weights, topk_ids=ids)

        return out + grouped_forward(x, topk_weights, topk_ids, self.group_of, self.local_of, 2, run)

    def load_kept(self, what: str, t: torch.Tensor) -> list[str]:
        """Load the stored kept stack `what` (kept_gate_up [K, 2I, H] or kept_down [K, H, I]) into the stock
        kernel, expert by expert, through its own weight loader; the parameter names loaded (relative to this
        module)."""
        kernel, width = self.kept_experts, self.experts.width
        K = len(self.experts.kept)
        want = (K, 2 * width, self.hidden_size) if what == "kept_gate_up" else (K, self.hidden_size, width)
        if tuple(t.shape) != want:
            raise LayoutError(f"{what}: shape {tuple(t.shape)}, but the layer's record needs {want}; restore the config.json "
                              "moetrim wrote")
        name = "w13_weight" if what == "kept_gate_up" else "w2_weight"
        param = getattr(kernel, name)
        shards = (("w1", lambda j: t[j, :width]), ("w3", lambda j: t[j, width:])) if what == "kept_gate_up" else \
            (("w2", lambda j: t[j]),)
        for j in range(K):
            for shard, block in shards:
                kernel.weight_loader(param=param, loaded_weight=block(j).contiguous(), weight_name=f"{kernel.layer_name}.{name}",
                                     shard_id=shard, expert_id=j, return_success=True)
        return [f"kept_experts.{name}"]


def build_replaced_native(stock_factory, kwargs: dict, spec: Mapping):
    """The layer's stock runner with a ReplacedRoutedExperts for `spec`: its kept experts in a stock
    RoutedExperts of the layer's kernel (or, with none kept, a small trait donor)."""
    prefix = kwargs.get("prefix", "")
    width, kept = int(spec["width"]), len(spec["kept"])
    kernel = stock_experts(stock_factory, kwargs, kept, width, f"{prefix}.moetrim_kept") if kept else None
    traits = None if kept else stock_experts(stock_factory, kwargs, 1, min(_TRAITS_WIDTH, width), f"{prefix}.moetrim_traits")
    return stock_factory(**kwargs, routed_experts_cls=ReplacedRoutedExperts,
                         routed_experts_args={"moetrim_spec": spec, "moetrim_hidden": int(kwargs["hidden_size"]),
                                              "moetrim_kept": kernel, "moetrim_traits": traits})


KeptLoader = Callable[[str, torch.Tensor], list[str]]


def load_native_weights(weights: Iterable[tuple[str, torch.Tensor]], modules: Mapping[int, tuple[str, ReplacedExperts]],
                        loaded: set[str], kept: Mapping[int, tuple[str, KeptLoader]] | None = None
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass every tensor on except a natively served layer's stored experts, copied into its ReplacedExperts
    (qualified names added to `loaded`); a layer in `kept` (index -> (qualified prefix, loader)) hands its kept
    stacks to that loader instead (the stock kernel that runs them)."""
    kept = kept or {}
    for name, t in weights:
        m = _TENSOR.search(name)
        index = int(m["index"]) if m else None
        if index not in modules:
            yield name, t
            continue
        if index in kept and m["what"] in ("kept_gate_up", "kept_down"):
            qual, load = kept[index]
            loaded.update(f"{qual}.{n}" for n in load(m["what"], t))
            continue
        qual, experts = modules[index]
        param = getattr(experts, m["what"], None)
        if param is None or tuple(param.shape) != tuple(t.shape):
            raise LayoutError(f"{name}: shape {tuple(t.shape)}, but the layer's record needs "
                              f"{None if param is None else tuple(param.shape)}; restore the config.json moetrim wrote")
        with torch.no_grad():
            param.copy_(t.to(device=param.device, dtype=param.dtype))
        loaded.add(f"{qual}.{m['what']}")


def check_native_loaded(modules: Mapping[int, tuple[str, ReplacedExperts]], loaded: set[str],
                        kernels: Iterable[str] = ()) -> None:
    """Every stored tensor of every natively served layer was loaded (`kernels`: qualified names of the stock
    kernels' weights that hold kept experts)."""
    stored = {f"{qual}.{n}" for qual, experts in modules.values() for n, _ in experts.named_parameters()}
    missing = sorted((stored | set(kernels)) - loaded)
    if missing:
        raise LayoutError(f"the checkpoint lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}, which its "
                          "config.json's replaced record needs")
