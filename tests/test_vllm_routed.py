"""Rerouted checkpoints in the vLLM plugin, without vLLM: the routing function the plugin gives each fused
MoE (`integrations/vllm_plugin/routed.py`), loaded from a checkpoint moetrim saved, routes every token as
the transformers model's router hook does, in every setting a fine-tuned model can record; it compiles to
one graph; the config vLLM builds names the plugin's model; bad checkpoints stop in one line.
(Serving itself, greedy equality in vLLM: benchmarks/serve.py.)"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open

import moetrim
from moetrim.assets.tiny import tiny_model, tiny_tokenizer
from moetrim.integrations.vllm_plugin.routed import (
    ServedRouting, check_routing_loaded, load_routing_weights, routing_kwargs, routing_spec, slots_per_token,
)
from moetrim.integrations.vllm_plugin.unpack import LayoutError
from moetrim.model.routing import RoutingSpec, choose_condensers, install_routing
from moetrim.model.view import find_moe_layers

SETTINGS = [  # (family, routing spec): every field a fine-tuned checkpoint can record
    ("qwen2_moe", dict(bias=True)),
    ("qwen3_moe", dict(bias=True, bias_apply="selection")),
    ("qwen3_moe", dict(bias=True, condensers=2)),
    ("qwen2_moe", dict(bias=True, condensers=1, budget="fixed", gate="learned")),
    ("olmoe", dict(bias=True, condensers=1, budget="fixed")),
    ("mixtral", dict(bias=True, condensers=2, gate="learned")),
]


def _saved_rerouted(tmp_path, family: str, fields: dict, seed: int = 0):
    """A tiny model rerouted as a fine-tuned one is (a non-zero bias, condensers chosen by it, a learned gate),
    saved by moetrim; returns the model, its config.json and its tensors."""
    m = tiny_model(family, **({"hidden_size": 128, "head_dim": 32} if family == "qwen3_moe" else {}))
    install_routing(m, RoutingSpec(**fields))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in m.named_parameters():
            if "moetrim_gate" in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        for name, b in m.named_buffers():
            if name.endswith("moetrim_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    if fields.get("condensers"):
        choose_condensers(m)
    out = moetrim.save(m, tmp_path / family, tokenizer=tiny_tokenizer(m.config.vocab_size))
    with safe_open(str(out / "model.safetensors"), framework="pt") as sf:
        state = {k: sf.get_tensor(k) for k in sf.keys()}
    return moetrim.load(out), json.loads((out / "config.json").read_text()), state


def _served(config: dict, model, state: dict) -> dict[int, ServedRouting]:
    spec = routing_spec(config)
    routings = {l.index: ServedRouting(spec, l.num_experts, l.hidden_size) for l in find_moe_layers(model)}
    loaded: set[str] = set()
    rest = dict(load_routing_weights(state.items(), routings, "moetrim_routing", loaded))
    assert not any(".moetrim_" in k for k in rest) and len(rest) + len(loaded) == len(state)
    check_routing_loaded(routings, "moetrim_routing", loaded)
    return routings


@pytest.mark.parametrize("family,fields", SETTINGS, ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in d.items())}" for f, d in SETTINGS])
def test_served_routing_routes_as_the_transformers_hook(tmp_path, family, fields):
    """The plugin's routing function, fed the stock gate's logits (what vLLM's gate computes), returns the
    same slots (routed experts, then condensers) with the same weights as the loaded model's router hook,
    and as many slots per token as the fused MoE is built with."""
    model, config, state = _saved_rerouted(tmp_path, family, fields)
    routings = _served(config, model, state)
    h = torch.randn(96, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    moved = 0
    for layer in find_moe_layers(model):
        with torch.no_grad():
            _, want_w, want_i = layer.router(h)
            logits = torch.nn.functional.linear(h, layer.router_weight)
            stock_i = torch.topk(logits.softmax(-1), layer.top_k, dim=-1).indices
            k = slots_per_token(routings[layer.index].spec, layer.top_k)
            got_w, got_i = routings[layer.index](hidden_states=h, gating_output=logits, topk=k, renormalize=True)
        assert got_i.dtype == torch.int32 and got_w.dtype == torch.float32 and got_i.shape == want_i.shape == (96, k)
        assert torch.equal(got_i.long(), want_i.long())
        torch.testing.assert_close(got_w, want_w.float(), rtol=1e-6, atol=1e-7)
        moved += int((stock_i.sort(-1).values != want_i[:, : layer.top_k].sort(-1).values).any(-1).sum())
    assert moved > 0  # the rerouting changes which experts run: the comparison above is not the stock router's


def test_served_routing_compiles_to_one_graph_with_no_host_read(tmp_path):
    model, config, state = _saved_rerouted(tmp_path, "qwen3_moe", dict(bias=True, condensers=2, gate="learned"))
    served = _served(config, model, state)[0]
    h = torch.randn(16, model.config.hidden_size)
    logits = torch.nn.functional.linear(h, find_moe_layers(model)[0].router_weight)
    k = slots_per_token(served.spec, 2)
    compiled = torch.compile(served, fullgraph=True, backend="eager")
    for rows in (h, h[:1]):
        want, got = served(rows, logits[: len(rows)], k), compiled(rows, logits[: len(rows)], k)
        assert torch.equal(want[1], got[1]) and torch.equal(want[0], got[0])


def test_routed_config_becomes_the_family_config_naming_the_plugin_model(tmp_path):
    from moetrim.integrations.vllm_plugin.config import MoetrimRoutedConfig

    _, config, _ = _saved_rerouted(tmp_path, "qwen3_moe", dict(bias=True, condensers=2))
    assert config["model_type"] == "moetrim_routed"
    cfg = MoetrimRoutedConfig.from_dict(config)
    assert cfg.model_type == "qwen3_moe" and cfg.architectures == ["MoetrimVarwidthQwen3MoeForCausalLM"]
    spec = routing_spec(pickle.loads(pickle.dumps(cfg)))  # vLLM hands configs between processes
    assert spec == RoutingSpec(**config["moetrim_routing"]) and spec.condensers == 2 and spec.normalise is bool(config["norm_topk_prob"])
    assert routing_spec({"num_experts": 8}) is None


def test_routing_kwargs_give_the_fused_moe_its_slots_and_our_function():
    served = ServedRouting(RoutingSpec(bias=True, condensers=2, normalise=True), 8, 16)
    base = {"num_experts": 8, "top_k": 2, "hidden_size": 16, "renormalize": True, "prefix": "model.layers.3.mlp.experts"}
    got = routing_kwargs(base, served)
    assert got["top_k"] == 4 and got["custom_routing_function"] is served and base["top_k"] == 2
    fixed = ServedRouting(RoutingSpec(bias=True, condensers=1, budget="fixed", normalise=False), 8, 16)
    assert routing_kwargs(base, fixed)["top_k"] == 2
    assert routing_kwargs(base, ServedRouting(RoutingSpec(bias=True, normalise=False), 8, 16))["top_k"] == 2


def test_bad_rerouted_checkpoints_stop_in_one_line(tmp_path):
    model, config, state = _saved_rerouted(tmp_path, "qwen2_moe", dict(bias=True, condensers=1))
    spec = routing_spec(config)

    def fresh():
        return {l.index: ServedRouting(spec, l.num_experts, l.hidden_size) for l in find_moe_layers(model)}

    def load(tensors):
        routings, loaded = fresh(), set()
        list(load_routing_weights(tensors.items(), routings, "moetrim_routing", loaded))
        check_routing_loaded(routings, "moetrim_routing", loaded)

    cases = [
        ({k: v for k, v in state.items() if not k.endswith("layers.2.mlp.gate.moetrim_bias")}, "lacks the routing state moetrim_routing.2.bias"),
        ({**state, "model.layers.0.mlp.gate.moetrim_condensers": torch.tensor([-1])}, "never chosen"),
        ({**state, "model.layers.0.mlp.gate.moetrim_bias": torch.zeros(3)}, r"shape \(3,\)"),
        ({**state, "model.layers.0.mlp.gate.moetrim_gate_weight": torch.zeros(1, 64)}, "does not describe"),
    ]
    for tensors, message in cases:
        with pytest.raises(LayoutError, match=message) as err:
            load(tensors)
        assert "\n" not in str(err.value)
    with pytest.raises(LayoutError, match="normalise"):
        routing_spec({"moetrim_routing": {**config["moetrim_routing"], "normalise": None}})
    with pytest.raises(LayoutError, match="cannot be read"):
        routing_spec({"moetrim_routing": {"bias": True, "temperature": 2}})
