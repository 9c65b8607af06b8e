"""The vLLM plugin's model class built and loaded end to end against a small fake of vLLM's Qwen3-MoE module.

CI has no vLLM, so the other plugin tests check its pure parts one by one. Here the plugin's model class
(`models.py`) is built over a fake `vllm.model_executor.models.qwen3_moe` that calls `FusedMoEFactory` the
way vLLM's does (a module-level name the plugin swaps while the model is built), and whose runner routes
then hands top-k weights and ids to its routed experts' `forward_modular`, as vLLM's runner does. Each of
moetrim's formats is saved, loaded through the plugin's `load_weights`, and every MoE layer's output is
compared with the transformers model's. This covers the wiring (per-layer sizes, width groups, native
replaced layers, rerouting, weight streams); how the real vLLM behaves is `benchmarks/serve.py`'s job.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import moetrim
from moetrim.assets.tiny import tiny_model, tiny_tokenizer
from moetrim.model.view import find_moe_layers

FAKE_QWEN3 = '''
import sys
import torch
from torch import nn

def FusedMoEFactory(**kwargs):
    return sys.modules["tests_fake_vllm"].FakeRunner(**kwargs)

class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, *, vllm_config, prefix=""):
        super().__init__()
        cfg = vllm_config.model_config.hf_text_config
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = FusedMoEFactory(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                                       hidden_size=cfg.hidden_size, intermediate_size=cfg.moe_intermediate_size,
                                       renormalize=cfg.norm_topk_prob, params_dtype=torch.float32, prefix=f"{prefix}.experts")

    def forward(self, x):
        return self.experts(x, self.gate(x))

class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, *, vllm_config, prefix=""):
        super().__init__()
        self.config = vllm_config.model_config.hf_config
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for i in range(self.config.num_hidden_layers):
            layer = nn.Module()
            layer.mlp = Qwen3MoeSparseMoeBlock(vllm_config=vllm_config, prefix=f"model.layers.{i}.mlp")
            self.model.layers.append(layer)

    def load_weights(self, weights):
        return sys.modules["tests_fake_vllm"].load_stock(self, weights)
'''


class FakeRoutedExperts(nn.Module):
    """vLLM's stock RoutedExperts as far as the plugin uses it: w13 [E, 2I, H], w2 [E, H, I], a loader, a kernel."""

    def __init__(self, num_experts: int, width: int, hidden: int, layer_name: str):
        super().__init__()
        self.layer_name = layer_name
        self.w13_weight = nn.Parameter(torch.zeros(num_experts, 2 * width, hidden))
        self.w2_weight = nn.Parameter(torch.zeros(num_experts, hidden, width))
        self.quant_method = SimpleNamespace(is_monolithic=False)

    def _ensure_moe_quant_config_init(self):
        pass

    def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        width = self.w2_weight.shape[2]
        with torch.no_grad():
            {"w1": lambda: param[expert_id, :width].copy_(loaded_weight),
             "w3": lambda: param[expert_id, width:].copy_(loaded_weight),
             "w2": lambda: param[expert_id].copy_(loaded_weight)}[shard_id]()
        return True

    def forward_modular(self, x, topk_weights, topk_ids, **_):
        out = torch.zeros_like(x)
        width = self.w2_weight.shape[2]
        for slot in range(topk_ids.shape[1]):
            e, w = topk_ids[:, slot].long(), topk_weights[:, slot].to(x.dtype)
            gu = torch.einsum("th,tih->ti", x, self.w13_weight[e])
            h = F.silu(gu[:, :width]) * gu[:, width:]
            out += w[:, None] * torch.einsum("ti,thi->th", h, self.w2_weight[e])
        return out


class FakeRunner(nn.Module):
    """vLLM's MoERunner as far as the plugin uses it: routes (or calls the custom routing function), then
    hands top-k weights and ids to `routed_experts.forward_modular`."""

    def __init__(self, **kw):
        super().__init__()
        self.kw, self.layer_name = kw, kw["prefix"]
        self.top_k, self.renormalize = kw["top_k"], kw.get("renormalize", True)
        self.custom_routing_function = kw.get("custom_routing_function")
        cls = kw.get("routed_experts_cls")
        if cls is None:
            self.routed_experts = FakeRoutedExperts(kw["num_experts"], kw["intermediate_size"], kw["hidden_size"],
                                                    self.layer_name)
        else:
            moe_config = SimpleNamespace(activation="silu", experts_per_token=kw["top_k"], num_experts=kw["num_experts"],
                                         hidden_dim=kw["hidden_size"])
            self.routed_experts = cls(self.layer_name, kw.get("params_dtype"), moe_config, None, None,
                                      **kw.get("routed_experts_args", {}))
        CONTEXT.static_forward_context[self.layer_name] = self
        CONTEXT.static_all_moe_layers.append(self.layer_name)

    def forward(self, hidden_states, router_logits):
        if self.custom_routing_function is not None:
            w, ids = self.custom_routing_function(hidden_states=hidden_states, gating_output=router_logits,
                                                  topk=self.top_k, renormalize=self.renormalize)
        else:
            w, ids = torch.topk(router_logits.float().softmax(-1), self.top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True) if self.renormalize else w
        return self.routed_experts.forward_modular(x=hidden_states, topk_weights=w, topk_ids=ids.to(torch.int32))


def load_stock(model, weights) -> set[str]:
    """The stock model's load_weights for the MoE parts: routers, per-expert and fused expert tensors."""
    params, loaded = dict(model.named_parameters()), set()
    name_of = {id(p): n for n, p in params.items()}
    for name, t in weights:
        parts = name.split(".")
        if not name.startswith("model.layers.") or ".mlp." not in name:
            continue  # attention, norms, embeddings: not in the fake
        block = model.model.layers[int(parts[2])].mlp
        if name.endswith("mlp.gate.weight"):
            param = params[name]
            param.data.copy_(t)
        elif parts[-1] in ("gate_up_proj", "down_proj"):  # transformers 5's fused experts
            re = block.experts.routed_experts
            param = re.w13_weight if parts[-1] == "gate_up_proj" else re.w2_weight
            param.data.copy_(t)
        else:  # model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight
            re, e = block.experts.routed_experts, int(parts[5])
            shard = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[parts[6]]
            param = re.w2_weight if shard == "w2" else re.w13_weight
            re.weight_loader(param, t, name, shard, e)
        loaded.add(name_of[id(param)])
    return loaded


CONTEXT = SimpleNamespace(static_forward_context={}, static_all_moe_layers=[])
_LIBRARY = []  # keeps the fake op registration alive


def _register_custom_op(op_name, op_func, fake_impl=None, **_):
    lib = torch.library.Library("vllm", "FRAGMENT")
    lib.define(op_name + torch.library.infer_schema(op_func, mutates_args=()))
    lib.impl(op_name, op_func, "CompositeExplicitAutograd")
    _LIBRARY.append(lib)


@pytest.fixture
def plugin_models(monkeypatch):
    """moetrim's plugin models module, imported over a fake vLLM."""
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here: serve.py checks the real thing")
    except ImportError:
        pass
    fakes = {
        "vllm": {}, "vllm.logger": {"init_logger": logging.getLogger},
        "vllm.distributed": {"get_tensor_model_parallel_world_size": lambda: 1},
        "vllm.config": {"get_current_vllm_config": lambda: SimpleNamespace(compilation_config=CONTEXT)},
        "vllm.utils": {}, "vllm.utils.torch_utils": {"direct_register_custom_op": _register_custom_op},
        "vllm.model_executor": {}, "vllm.model_executor.models": {},
        "tests_fake_vllm": {"FakeRunner": FakeRunner, "load_stock": load_stock},
    }
    for name, attrs in fakes.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
    qwen3 = types.ModuleType("vllm.model_executor.models.qwen3_moe")
    exec(compile(FAKE_QWEN3, "fake_qwen3_moe", "exec"), qwen3.__dict__)
    monkeypatch.setitem(sys.modules, "vllm.model_executor.models.qwen3_moe", qwen3)
    monkeypatch.delitem(sys.modules, "moetrim.integrations.vllm_plugin.models", raising=False)
    return importlib.import_module("moetrim.integrations.vllm_plugin.models")


def _served(models, path):
    from moetrim.integrations.vllm_plugin.config import (
        MoetrimReplacedConfig, MoetrimRoutedConfig, MoetrimVarwidthConfig,
    )

    raw = json.loads((path / "config.json").read_text())
    cls = {"moetrim_varwidth": MoetrimVarwidthConfig, "moetrim_replaced": MoetrimReplacedConfig,
           "moetrim_routed": MoetrimRoutedConfig}[raw["model_type"]]
    cfg = cls.from_dict(raw)
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=cfg, hf_text_config=cfg))
    model = getattr(models, cfg.architectures[0])(vllm_config=vllm_config)
    with safe_open(str(path / "model.safetensors"), framework="pt") as sf:
        loaded = model.load_weights((k, sf.get_tensor(k)) for k in sf.keys())
    return model, loaded


def _formats(tmp_path):
    """Tiny Qwen3-MoE checkpoints in each of moetrim's formats (and one rerouted variable-width)."""
    from moetrim.model.replaced import ReplacedExperts, install_layer
    from moetrim.model.routing import RoutingSpec, choose_condensers, install_routing
    from moetrim.plan import make_plan

    dense = tiny_model("qwen3_moe", hidden_size=128, head_dim=32)
    tok = tiny_tokenizer(dense.config.vocab_size)

    def varwidth(m):
        plan = make_plan(m, None, criterion="random", ratio=0.5, allocation="global", seed=1)
        moetrim.apply_plan(m, plan, force_varwidth=True)
        return m, plan

    def reroute(m):
        install_routing(m, RoutingSpec(bias=True, condensers=2))
        with torch.no_grad():
            for name, b in m.named_buffers():
                if name.endswith("moetrim_bias"):
                    b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
        choose_condensers(m)
        return m

    out = {}
    m, plan = varwidth(copy.deepcopy(dense))
    out["varwidth grouped"] = moetrim.save(m, tmp_path / "vw", tokenizer=tok, plan=plan)
    m = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(3)
    for layer in find_moe_layers(m):
        new = ReplacedExperts(8, layer.hidden_size, layer.widths[0], [0, 2, 3], [[1, 4], [6, 7]], 4, layer.activation(),
                              novices=[5])
        with torch.no_grad():
            for p in new.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        install_layer(m, layer, new)
    out["replaced native with novices"] = moetrim.save(m, tmp_path / "rep", tokenizer=tok)
    out["rerouted"] = moetrim.save(reroute(copy.deepcopy(dense)), tmp_path / "rr", tokenizer=tok)
    m, plan = varwidth(copy.deepcopy(dense))
    out["rerouted varwidth grouped"] = moetrim.save(reroute(m), tmp_path / "rrvw", tokenizer=tok, plan=plan)
    from helpers import mixed_auto_plan

    from moetrim.calibrate import calibrate

    m = copy.deepcopy(dense)
    prof = calibrate(m, [torch.randint(0, 127, (4, 32), generator=torch.Generator().manual_seed(5))], seq_len=32, batch_size=2)
    mixed = mixed_auto_plan(m, prof)[0]
    moetrim.apply_plan(m, mixed, prof)
    out["auto mix: varwidth grouped and replaced native"] = moetrim.save(m, tmp_path / "mix", tokenizer=tok, plan=mixed, profile=prof)
    return out


def test_every_format_builds_loads_and_computes_what_transformers_does(plugin_models, tmp_path, monkeypatch):
    monkeypatch.setenv("MOETRIM_VLLM_GROUP_ALIGN", "1")  # exact-width groups: several per layer
    from moetrim.integrations.vllm_plugin.grouped import GroupedRoutedExperts
    from moetrim.integrations.vllm_plugin.replaced_native import ReplacedRoutedExperts

    for what, path in _formats(tmp_path).items():
        served, loaded = _served(plugin_models, path)
        want = moetrim.load(path)
        kinds = {type(m) for m in served.modules()}
        assert (GroupedRoutedExperts in kinds) == ("grouped" in what), what
        assert (ReplacedRoutedExperts in kinds) == ("replaced" in what), what
        assert bool(len(served.moetrim_routing)) == ("rerouted" in what), what
        assert not [n for n, _ in served.named_parameters() if n not in loaded and ".mlp." in n and "traits" not in n], what
        for m in served.modules():  # kept experts live once, in the family's stock kernel (FakeRoutedExperts here)
            if isinstance(m, ReplacedRoutedExperts):
                assert m.experts.kept_gate_up is None and m.experts.kept_down is None, what
                assert (m.kept_experts is not None) == bool(m.experts.kept), what
                if m.kept_experts is not None:
                    assert m.kept_experts.w13_weight.shape[0] == len(m.experts.kept) and m.kept_experts.w13_weight.abs().sum() > 0
        x = torch.randn(24, 128, generator=torch.Generator().manual_seed(5))
        for layer in find_moe_layers(want):
            with torch.no_grad():
                ref = layer.block(x[None])
                ref = (ref[0] if isinstance(ref, tuple) else ref)[0]
                got = served.model.layers[layer.index].mlp(x)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=f"{what}, layer {layer.index}")


def test_reconstruction_is_chosen_by_the_environment_and_refuses_novices(plugin_models, tmp_path, monkeypatch):
    from moetrim.integrations.vllm_plugin.unpack import LayoutError

    monkeypatch.setenv("MOETRIM_VLLM_REPLACED", "reconstructed")
    path = _formats(tmp_path)["replaced native with novices"]
    with pytest.raises(LayoutError, match="novice"):
        _served(plugin_models, path)
