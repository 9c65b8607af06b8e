"""vLLM model classes for moetrim variable-width checkpoints (imported by vLLM's registry, lazily).

Each class is the family's stock vLLM model with one change while it is built: the family's MoE block
class is swapped, for the duration of the constructor, for a subclass that reads the layer index from
its prefix and builds that layer at the layer's own width, expert count and top-k. Nothing dense is
allocated first: each layer is born at its size, and every router, shared expert and fused-MoE kernel is
vLLM's own. Weight loading unpacks moetrim's packed experts (`unpack.py`).

A layer whose experts all share one width is one stock fused-MoE at that width. A layer whose experts
differ in width is served GROUPED (`grouped.py`): one stock fused-MoE per width group, behind the layer's
stock runner and router. The labelled fallback, PADDED (every expert zero-padded to the layer's widest:
exact, saves nothing), is used when MOETRIM_VLLM_PADDED=1 or when the family's fused-MoE call uses a
feature the grouped path does not carry (see `grouped.unsupported_reason`); both log a warning.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import re
import sys

import torch
from vllm.logger import init_logger

from moetrim.integrations.vllm_plugin.families import FAMILIES, Family, family
from moetrim.integrations.vllm_plugin.replaced import check_reconstructible, per_expert_replaced, replaced_records
from moetrim.integrations.vllm_plugin.replaced_native import (
    MODE_ENV,
    build_replaced_native,
    check_native_loaded,
    load_native_weights,
    native_reason,
    requested_reconstruction,
)
from moetrim.integrations.vllm_plugin.routed import (
    ServedRouting,
    check_routing_loaded,
    load_routing_weights,
    routing_kwargs,
    routing_spec,
)
from moetrim.integrations.vllm_plugin.unpack import (
    _PACKED,
    LayerLayout,
    group_plan,
    per_expert_tensors,
    read_layouts,
    served_widths,
    unpack_down,
    unpack_gate_up,
)
from moetrim.model.varwidth import VARWIDTH_KEY

logger = init_logger("vllm.moetrim")  # under vllm's logger, so its INFO lines show in vLLM's log
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
PADDED_ENV = "MOETRIM_VLLM_PADDED"  # "1": serve mixed-width layers padded (the fallback) instead of grouped


def _layer_index(prefix: str) -> int | None:
    found = _LAYER.search(prefix or "")
    return int(found.group(1)) if found else None


class _LayerModelConfig:
    """vllm_config.model_config as one layer's block sees it: the layer's own hf config, all else shared."""

    def __init__(self, model_config, hf_config):
        self._inner, self.hf_config, self.hf_text_config = model_config, hf_config, hf_config

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _LayerVllmConfig:
    def __init__(self, vllm_config, hf_config):
        self._inner, self.model_config = vllm_config, _LayerModelConfig(vllm_config.model_config, hf_config)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _layer_config(config, fam: Family, layout: LayerLayout, width: int):
    cfg = copy.copy(config)
    for key, value in ((fam.width_key, width), (fam.count_key, layout.num_experts), (fam.top_k_key, layout.top_k)):
        setattr(cfg, key, value)
    return cfg


def _sized_kwargs(fam: Family, kwargs: dict, layout: LayerLayout, width: int) -> dict:
    """The block's constructor arguments with this layer's width, expert count and top-k."""
    kwargs = dict(kwargs)
    if fam.style == "explicit":
        kwargs.update(num_experts=layout.num_experts, top_k=layout.top_k, intermediate_size=width)
    elif fam.style == "config":
        kwargs["config"] = _layer_config(kwargs["config"], fam, layout, width)
    else:  # "vllm_config"
        vc = kwargs["vllm_config"]
        kwargs["vllm_config"] = _LayerVllmConfig(vc, _layer_config(vc.model_config.hf_text_config, fam, layout, width))
    return kwargs


# FusedMoEFactory arguments that say the family routes otherwise than softmax -> top-k (moetrim cannot reroute it)
_OTHER_ROUTING = ("custom_routing_function", "use_grouped_topk", "e_score_correction_bias", "zero_expert_type")


@contextlib.contextmanager
def _per_layer_blocks(fam: Family, layouts: dict[int, LayerLayout], widths: dict[int, int], plans: dict, fallback: dict,
                      reroute=None, native: dict | None = None, reconstructed: dict | None = None):
    """While the model is built, the family's MoE block class builds each layer at its recorded size, and
    its fused-MoE factory builds a layer listed in `plans` as width groups (one it cannot group is recorded
    in `fallback` with the reason, and built padded at the layer's widest width). With `reroute`
    (index, factory kwargs) -> ServedRouting, every MoE layer's fused MoE routes with moetrim's routing.
    A replaced layer in `native` (index -> record) is built with moetrim's replaced experts module; one that
    cannot be is recorded in `reconstructed` with the reason (and built stock, to be loaded reconstructed)."""
    from moetrim.integrations.vllm_plugin.grouped import (
        build_grouped,
        unsupported_reason,
    )

    native = native or {}
    reconstructed = {} if reconstructed is None else reconstructed

    module = importlib.import_module(f"vllm.model_executor.models.{fam.module}")
    stock = getattr(module, fam.block)
    stock_factory = getattr(module, "FusedMoEFactory", None)

    class PerLayerBlock(stock):  # a subclass, so the model's isinstance checks still hold
        def __init__(self, *args, **kwargs):
            if args:
                raise TypeError(f"moetrim plugin: {fam.block} was called with positional arguments; this vLLM differs "
                                "from the one the plugin was written for")
            index = _layer_index(kwargs.get("prefix", ""))
            if index in layouts:
                kwargs = _sized_kwargs(fam, kwargs, layouts[index], widths[index])
            super().__init__(**kwargs)

    def factory(*args, **kwargs):
        index = _layer_index(kwargs.get("prefix", ""))
        if reroute is not None and index is not None:
            other = [k for k in _OTHER_ROUTING if kwargs.get(k) is not None and kwargs.get(k) is not False]
            if args or other:
                raise TypeError(f"moetrim plugin: {fam.module}.FusedMoEFactory was called with "
                                f"{'positional arguments' if args else ', '.join(other)}; a rerouted checkpoint needs a "
                                "softmax top-k fused MoE whose routing function the plugin can set")
            kwargs = routing_kwargs(kwargs, reroute(index, kwargs))
        if index in native:
            reason = "positional arguments" if args else native_reason(kwargs, native[index])
            if reason:
                reconstructed[index] = reason
                return stock_factory(*args, **kwargs)
            return build_replaced_native(stock_factory, kwargs, native[index])
        if index not in plans:
            return stock_factory(*args, **kwargs)
        reason = "positional arguments" if args else unsupported_reason(kwargs)
        if reason:
            fallback[index] = reason
            return stock_factory(*args, **kwargs)
        return build_grouped(stock_factory, kwargs, plans[index])

    PerLayerBlock.__name__ = PerLayerBlock.__qualname__ = stock.__name__
    setattr(module, fam.block, PerLayerBlock)
    if reroute is not None and stock_factory is None:
        raise RuntimeError(f"moetrim: vllm.model_executor.models.{fam.module} has no FusedMoEFactory, through which the "
                           "plugin sets a rerouted checkpoint's routing; this vLLM differs from the one the plugin was written for")
    if stock_factory is None:
        fallback.update({i: f"vllm.model_executor.models.{fam.module} has no FusedMoEFactory" for i in plans})
        reconstructed.update({i: f"vllm.model_executor.models.{fam.module} has no FusedMoEFactory" for i in native})
    elif plans or reroute is not None or native:
        setattr(module, "FusedMoEFactory", factory)
    try:
        yield
    finally:
        setattr(module, fam.block, stock)
        if stock_factory is not None:
            setattr(module, "FusedMoEFactory", stock_factory)


class _Varwidth:
    """Mixed in before the family's stock vLLM model class."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        from moetrim.integrations.vllm_plugin.grouped import (
            GroupedRoutedExperts,
            group_alignment,
        )

        config = vllm_config.model_config.hf_config
        fam = family(config.model_type)
        layouts = read_layouts(config) if getattr(config, VARWIDTH_KEY, None) else {}
        records = replaced_records(config)
        native = {} if requested_reconstruction() else records
        reconstructed: dict[int, str] = {i: f"{MODE_ENV}=reconstructed" for i in records} if not native else {}
        widths, mixed = served_widths(layouts)
        padded_by_request = os.environ.get(PADDED_ENV, "") not in ("", "0")
        align = group_alignment()
        plans = {} if padded_by_request else {i: group_plan(layouts[i], align) for i in mixed}
        fallback: dict[int, str] = {i: f"{PADDED_ENV}=1" for i in mixed} if padded_by_request else {}
        spec = routing_spec(config)
        routings: dict[int, ServedRouting] = {}

        def reroute(index: int, kwargs: dict) -> ServedRouting:
            routings[index] = ServedRouting(spec, int(kwargs["num_experts"]), int(kwargs["hidden_size"]),
                                            kwargs.get("params_dtype") or torch.get_default_dtype())
            return routings[index]

        with _per_layer_blocks(fam, layouts, widths, plans, fallback, reroute if spec is not None else None, native,
                               reconstructed):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.moetrim_family, self.moetrim_layouts = fam, layouts
        self._moetrim_replaced_layers(records, reconstructed)
        self.moetrim_routing = torch.nn.ModuleDict({str(i): m for i, m in sorted(routings.items())})
        if spec is not None:
            logger.info("moetrim: %d MoE layers route with the checkpoint's fine-tuned routing (bias: %s, condensers: %d, "
                        "budget %s, gate %s): one routing function per layer inside vLLM's fused MoE", len(routings),
                        spec.bias_apply if spec.bias else "none", spec.condensers, spec.budget, spec.gate)
        self.moetrim_grouped = {}  # layer index -> (qualified module name, GroupedRoutedExperts)
        for name, module in self.named_modules():
            if isinstance(module, GroupedRoutedExperts):
                self.moetrim_grouped[_layer_index(name)] = (name, module)
        missing = sorted(set(plans) - set(self.moetrim_grouped) - set(fallback))
        if missing:
            raise RuntimeError(f"moetrim: layers {missing} were to be served grouped but their fused-MoE was not built "
                               f"through {fam.module}.FusedMoEFactory; this vLLM differs from the one the plugin was "
                               f"written for (serve padded with {PADDED_ENV}=1)")
        padded = sorted(fallback)
        if self.moetrim_grouped:
            logger.info("moetrim: %d layers with experts of different widths served GROUPED (one fused MoE per width, "
                        "widths rounded up to multiples of %d; groups per layer: %s)", len(self.moetrim_grouped), align,
                        {i: len(m.groups) for i, (_, m) in sorted(self.moetrim_grouped.items())})
        if padded:
            logger.warning("moetrim: layers %s have experts of different widths and are served PADDED to each layer's "
                           "widest expert (exact, but no memory or time saved there), because: %s", padded,
                           "; ".join(sorted(set(fallback.values()))))
        self.moetrim_pad_to = {i: widths[i] for i in padded}

    def _moetrim_replaced_layers(self, records: dict, reconstructed: dict[int, str]) -> None:
        """Which replaced layers are served natively (their modules) and which reconstructed (their records)."""
        from moetrim.integrations.vllm_plugin.replaced_native import ReplacedRoutedExperts

        self.moetrim_native, self.moetrim_native_kept, self.moetrim_native_extra = {}, {}, set()
        for name, module in self.named_modules():
            if isinstance(module, ReplacedRoutedExperts):
                self.moetrim_native[_layer_index(name)] = (f"{name}.experts", module.experts)
                if module.kept_experts is not None:
                    self.moetrim_native_kept[_layer_index(name)] = (name, module.load_kept)
                else:
                    self.moetrim_native_extra |= {f"{name}.traits.{n}" for n, _ in module.traits.named_parameters()}
        self.moetrim_replaced = {i: records[i] for i in sorted(reconstructed)}
        check_reconstructible(self.moetrim_replaced)
        if self.moetrim_native:
            logger.info("moetrim: replaced experts in layers %s served NATIVELY: the kept experts in the family's stock "
                        "fused MoE, the group bases and low-rank corrections as stored (each base once per token routed to "
                        "any member), so the memory replacing saves is kept", sorted(self.moetrim_native))
        if self.moetrim_replaced:
            logger.warning("moetrim: replaced experts in layers %s are served RECONSTRUCTED: each replaced expert is rebuilt "
                           "as its base + low-rank correction into the family's stock fused MoE at load (exact, but the "
                           "memory the shared bases save is not kept in vLLM), because: %s", sorted(self.moetrim_replaced),
                           "; ".join(sorted(set(reconstructed.values()))))

    def load_weights(self, weights):
        fam = self.moetrim_family
        loaded: set[str] = set()
        routings = {int(i): m for i, m in self.moetrim_routing.items()}
        if routings:
            weights = load_routing_weights(weights, routings, "moetrim_routing", loaded)
        if self.moetrim_native:
            weights = load_native_weights(weights, self.moetrim_native, loaded, self.moetrim_native_kept)
        if self.moetrim_replaced:
            weights = per_expert_replaced(weights, self.moetrim_replaced, fam.names)
        stock = super().load_weights(per_expert_tensors(
            self._moetrim_grouped_weights(weights, loaded), self.moetrim_layouts, fam.names, self.config.hidden_size,
            self.moetrim_pad_to, dict(fam.rename)))
        if routings:
            check_routing_loaded(routings, "moetrim_routing", loaded)
        if self.moetrim_native:
            check_native_loaded(self.moetrim_native, loaded, [f"{q}.kept_experts.{w}" for q, _ in self.moetrim_native_kept.values()
                                                              for w in ("w13_weight", "w2_weight")])
            loaded |= self.moetrim_native_extra  # the trait donors: never run, nothing to load
        return (set(stock) if stock is not None else set()) | loaded

    def _moetrim_grouped_weights(self, weights, loaded: set[str]):
        """Pass every tensor on except a grouped layer's packed experts, which are loaded into its groups
        here (each expert once both of its layer's packed tensors have been seen)."""
        pending: dict[int, dict[str, torch.Tensor]] = {}
        hidden = self.config.hidden_size
        for name, t in weights:
            m = _PACKED.match(name)
            index = int(m["index"]) if m else None
            if index not in self.moetrim_grouped:
                yield name, t
                continue
            got = pending.setdefault(index, {})
            got[m["what"]] = t
            if len(got) < 2:
                continue
            layout, (qual, module) = self.moetrim_layouts[index], self.moetrim_grouped[index]
            gate_up, down = unpack_gate_up(got["gate_up"], layout), unpack_down(got["down_blocks"], layout, hidden)
            for e, ((gate, up), dn) in enumerate(zip(gate_up, down)):
                loaded.update(f"{qual}.{p}" for p in module.load_expert(e, gate, up, dn))
            del pending[index]
        if pending:
            raise RuntimeError(f"moetrim: layers {sorted(pending)} are missing gate_up or down_blocks in the checkpoint")


def _model_class(fam: Family) -> type:
    stock = getattr(importlib.import_module(f"vllm.model_executor.models.{fam.module}"), fam.architecture)
    return type(fam.plugin_architecture, (_Varwidth, stock), {
        "__module__": __name__, "__doc__": f"{fam.architecture} with per-layer expert widths (moetrim)."})


def __getattr__(name: str):  # PEP 562: vLLM's registry imports "module:Class"; build the class then
    for fam in FAMILIES.values():
        if fam.plugin_architecture == name:
            cls = _model_class(fam)
            setattr(sys.modules[__name__], name, cls)
            return cls
    raise AttributeError(name)
