"""The grouped serving path: a layer whose experts differ in width, as one stock fused-MoE per width group.

vLLM is imported inside functions only (`held_expert_params` needs none). While a plugin model is built,
the family module's `FusedMoEFactory` is wrapped (`models._per_layer_blocks`), and for a layer with mixed
widths `build_grouped` builds

  * one stock fused-MoE per width group (`FusedMoEFactory` with that group's expert count and width,
    top_k = 1, no router work of its own): only its `RoutedExperts` (weights, quant method, kernel) is
    kept; the group's own runner is unregistered from vLLM's forward context, it is never called;
  * the layer's stock runner (`FusedMoEFactory` with the family's own arguments: router, renormalisation,
    shared expert, scaling, reductions are vLLM's), whose `RoutedExperts` is `GroupedRoutedExperts`.

The runner routes once over all the layer's experts and hands topk weights / ids to
`GroupedRoutedExperts.forward_modular`, which runs `unpack.grouped_forward`: per group, the rows routed
into it, top-1 with local ids and the slot weights, through that group's own modular kernel, added back.
That call is one opaque custom op (`torch.ops.vllm.moetrim_grouped_experts`), as vLLM's own MoE forward
is on GPU: its row counts depend on the routing, which a compiled graph cannot trace through.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrim.integrations.vllm_plugin.unpack import (
    GroupPlan,
    grouped_forward,
    pad_cols,
    pad_rows,
)

# FusedMoEFactory arguments that describe the experts' weights and kernel (the rest describe routing,
# shared experts and reductions, which stay with the layer's own runner).
_GROUP_KWARGS = ("hidden_size", "params_dtype", "quant_config", "tp_size", "dp_size", "pcp_size", "activation",
                 "has_bias", "is_sequence_parallel", "ckpt_names", "is_fused_checkpoint_transposed", "swiglu_limit",
                 "swiglu_alpha", "swiglu_beta", "activation_situ_beta", "activation_situ_linear_beta")
# Arguments a grouped layer cannot honour (its groups would need them too): such a layer is padded.
_UNSUPPORTED = ("apply_router_weight_on_input", "fuse_shared_experts", "routed_experts_cls", "runner_cls",
                "zero_expert_type", "enable_eplb")


ALIGN_ENV = "MOETRIM_VLLM_GROUP_ALIGN"  # experts whose widths round up to the same multiple share a group


def group_alignment() -> int:
    """Width granularity of the groups: $MOETRIM_VLLM_GROUP_ALIGN, else the fused-MoE kernel's own padding
    granularity (vLLM's CPU kernel pads every width to a multiple of 32, so grouping at 32 costs no memory
    or work the kernel would not spend anyway, and makes fewer kernel calls), else 1 (exact widths)."""
    import os

    if os.environ.get(ALIGN_ENV):
        return max(1, int(os.environ[ALIGN_ENV]))
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
                CPUUnquantizedExperts,
            )

            return int(CPUUnquantizedExperts._intermediate_alignment())
    except Exception:  # another vLLM: exact widths are always correct
        pass
    return 1


def unsupported_reason(kwargs: dict) -> str | None:
    """Why this FusedMoEFactory call cannot be served grouped (None: it can)."""
    bad = [k for k in _UNSUPPORTED if kwargs.get(k)]
    return f"FusedMoEFactory called with {', '.join(bad)}" if bad else None


# layer name -> module with run(x, topk_weights, topk_ids), for the custom op (grouped layers here, natively
# served replaced layers in `replaced_native.py`). Per process: vLLM builds one model per worker process; two
# plugin models built in one process (in-process engines) would share layer names, the later one winning.
_LAYERS: dict[str, nn.Module] = {}
_OP = "moetrim_grouped_experts"


def _grouped_experts_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        layer_name: str) -> torch.Tensor:
    return _LAYERS[layer_name].run(x, topk_weights, topk_ids)


def _grouped_experts_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          layer_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def register_op() -> None:
    import torch as _t

    if hasattr(_t.ops.vllm, _OP):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(op_name=_OP, op_func=_grouped_experts_op, fake_impl=_grouped_experts_fake)


class QuantMethodView:
    """What the layer's runner reads from `routed_experts.quant_method` (kernel traits, identical in every
    group), forwarded to a stock RoutedExperts' (`source()`), with `overrides`. Not a QuantizeMethodBase, so
    vLLM's post-load step does not process the module that holds it (it processes the stock RoutedExperts,
    which are submodules)."""

    def __init__(self, source, **overrides):
        self._source, self._overrides = source, overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._source().quant_method, name)


class PluginRoutedExperts(nn.Module):
    """What a layer runner's `RoutedExperts` must offer, for the plugin's stand-ins: the attributes the runner
    reads, kernel traits from a stock RoutedExperts (`trait_source()`), and forward_modular as the plugin's
    opaque custom op, which calls `run(x, topk_weights, topk_ids)` of the layer found by name."""

    def __init__(self, layer_name, params_dtype, moe_config, quant_config, expert_map_manager, hidden_size: int,
                 trait_source, **trait_overrides):
        super().__init__()
        self.layer_name, self.params_dtype, self.moe_config = layer_name, params_dtype, moe_config
        self.quant_config, self.expert_map_manager = quant_config, expert_map_manager
        self.activation, self.top_k = moe_config.activation, moe_config.experts_per_token
        self.global_num_experts = self.local_num_experts = moe_config.num_experts
        self.hidden_size = hidden_size
        self.apply_router_weight_on_input = False
        self._quant_view = QuantMethodView(trait_source, **trait_overrides)
        register_op()
        _LAYERS[layer_name] = self

    @property
    def quant_method(self):
        return self._quant_view

    @property
    def expert_map(self):
        return None

    def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        if shared_experts is not None:  # runs only if the kernel would have run them itself (MK-internal)
            from vllm.model_executor.layers.fused_moe.runner.shared_experts import (
                SharedExpertsOrder,
            )

            shared_experts(shared_experts_input, SharedExpertsOrder.MK_INTERNAL_OVERLAPPED)
        return getattr(torch.ops.vllm, _OP)(x, topk_weights, topk_ids, self.layer_name)

    def run(self, x, topk_weights, topk_ids):
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        raise AssertionError("Call forward_modular instead.")


class GroupedRoutedExperts(PluginRoutedExperts):
    """Stands in for the layer runner's `RoutedExperts`: one stock RoutedExperts per width group."""

    def __init__(self, layer_name, params_dtype, moe_config, quant_config, expert_map_manager, *,
                 moetrim_groups: list, moetrim_plan: GroupPlan, **_routing_args):
        super().__init__(layer_name, params_dtype, moe_config, quant_config, expert_map_manager, moe_config.hidden_dim,
                         lambda: self.groups[0])
        self.plan = moetrim_plan
        self.groups = nn.ModuleList(moetrim_groups)
        self.register_buffer("group_of", torch.tensor(moetrim_plan.group_of, dtype=torch.long), persistent=False)
        self.register_buffer("local_of", torch.tensor(moetrim_plan.local_of, dtype=torch.long), persistent=False)

    def _ensure_moe_quant_config_init(self):
        for g in self.groups:
            g._ensure_moe_quant_config_init()

    def run(self, x, topk_weights, topk_ids):
        if self.groups[0].quant_method.is_monolithic:
            raise RuntimeError("moetrim: this vLLM's fused-MoE kernel routes internally (monolithic); grouped "
                               "variable-width layers need a modular kernel. Serve padded: MOETRIM_VLLM_PADDED=1")

        def run(g: int, rows, weights, ids):
            return self.groups[g].forward_modular(x=rows, topk_weights=weights, topk_ids=ids)

        return grouped_forward(x, topk_weights, topk_ids, self.group_of, self.local_of, len(self.groups), run)

    def load_expert(self, e: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> list[str]:
        """Load expert `e` (router order) into its group through the group's own weight loader (which
        handles tensor-parallel sharding); returns the parameter names (relative to this module) loaded."""
        g, j = self.plan.group_of[e], self.plan.local_of[e]
        grp, width = self.groups[g], self.plan.groups[g].width
        loaded = []
        for param_name, shard, t in (("w13_weight", "w1", pad_rows(gate, width)), ("w13_weight", "w3", pad_rows(up, width)),
                                     ("w2_weight", "w2", pad_cols(down, width))):
            param = getattr(grp, param_name)
            ok = grp.weight_loader(param=param, loaded_weight=t.contiguous(), weight_name=f"{grp.layer_name}.{param_name}",
                                   shard_id=shard, expert_id=j, return_success=True)
            if ok:
                loaded.append(f"groups.{g}.{param_name}")
        return loaded


def stock_experts(stock_factory, kwargs: dict, num_experts: int, width: int, prefix: str):
    """A stock RoutedExperts (weights, quant method, kernel) of `num_experts` experts at `width`, made with the
    layer's own kernel arguments; its runner is unregistered (never called)."""
    gk = {k: kwargs[k] for k in _GROUP_KWARGS if k in kwargs}
    gk.update(num_experts=num_experts, top_k=1, intermediate_size=width, renormalize=False, prefix=prefix)
    runner = stock_factory(**gk)
    _unregister(runner)
    return runner.routed_experts


def _unregister(runner) -> None:
    """A group's own runner is never called: take it out of vLLM's MoE layer registry (which maps MoE calls
    to layers by name and, in compiled graphs, by call order)."""
    from vllm.config import get_current_vllm_config

    cc = get_current_vllm_config().compilation_config
    cc.static_forward_context.pop(runner.layer_name, None)
    if runner.layer_name in cc.static_all_moe_layers:
        cc.static_all_moe_layers.remove(runner.layer_name)


def build_grouped(stock_factory, kwargs: dict, plan: GroupPlan):
    """The layer's stock runner with a GroupedRoutedExperts built from one stock fused-MoE per group."""
    prefix = kwargs.get("prefix", "")
    groups = [stock_experts(stock_factory, kwargs, len(grp.experts), grp.width, f"{prefix}.moetrim_group{g}")
              for g, grp in enumerate(plan.groups)]
    return stock_factory(**kwargs, routed_experts_cls=GroupedRoutedExperts,
                         routed_experts_args={"moetrim_groups": groups, "moetrim_plan": plan})


def held_expert_params(model) -> dict:
    """Routed-expert weights a built vLLM model holds (numel of every fused-MoE w13 / w2 tensor, after the
    kernel's own padding and packing, and of every natively served replaced layer's stored tensors), and the
    width groups of each grouped layer. For `LLM.apply_model(held_expert_params)` (needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 with a separate
    engine process)."""
    from moetrim.model.replaced import ReplacedExperts

    held = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("w13_weight", "w2_weight")))
    held += sum(p.numel() for m in model.modules() if isinstance(m, ReplacedExperts) for p in m.parameters())
    groups = {n: [(g.width, len(g.experts)) for g in m.plan.groups]
              for n, m in model.named_modules() if isinstance(m, GroupedRoutedExperts)}
    return {"held_routed_params": held, "groups": groups}
