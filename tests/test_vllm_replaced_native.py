"""Replaced checkpoints served natively by the vLLM plugin, without vLLM: the stored tensors stream into
moetrim's ReplacedExperts (the module the plugin's routed-experts class runs), which then computes what the
saved model's own layer computes on the same routing; novices included; bad checkpoints stop in one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import moetrim
from moetrim.assets.tiny import tiny_model, tiny_tokenizer
from moetrim.integrations.vllm_plugin.replaced import replaced_records
from moetrim.integrations.vllm_plugin.replaced_native import check_native_loaded, load_native_weights
from moetrim.integrations.vllm_plugin.unpack import LayoutError
from moetrim.model.replaced import ReplacedExperts
from moetrim.model.view import _GatedActivation, find_moe_layers


def _saved(tmp_path, family: str, novices: bool):
    from moetrim.apply.replace import build_replaced
    from moetrim.model.replaced import install_layer

    m = tiny_model(family, **({"hidden_size": 128, "head_dim": 32} if family == "qwen3_moe" else {}))
    for layer in find_moe_layers(m):
        if novices:  # expert 5 becomes a novice: rebuild the module with it as one
            new = ReplacedExperts(layer.num_experts, layer.hidden_size, layer.widths[0], [0, 2, 3], [[1, 4], [6, 7]], 4,
                                  layer.activation(), novices=[5])
        else:
            new = build_replaced(layer, [0, 2, 3, 5], [[1, 4], [6, 7]], 4, init="zero", seed=0)
        install_layer(m, layer, new)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".experts." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out = moetrim.save(m, tmp_path / family, tokenizer=tiny_tokenizer(m.config.vocab_size))
    with safe_open(str(out / "model.safetensors"), framework="pt") as sf:
        state = {k: sf.get_tensor(k) for k in sf.keys()}
    return m, json.loads((out / "config.json").read_text()), state


def _native(config: dict, hidden: int) -> dict:
    return {i: (f"model.layers.{i}.mlp.experts.routed_experts.experts",
                ReplacedExperts(s["num_experts"], hidden, s["width"], s["kept"], s["groups"], s["rank"], _GatedActivation(F.silu),
                                novices=s.get("novices", ())))
            for i, s in replaced_records(config).items()}


@pytest.mark.parametrize("family,novices", [("qwen2_moe", False), ("qwen3_moe", True), ("mixtral", False)])
def test_native_module_loaded_from_the_checkpoint_computes_the_saved_layer(tmp_path, family, novices):
    model, config, state = _saved(tmp_path, family, novices)
    native = _native(config, model.config.hidden_size)
    loaded: set[str] = set()
    rest = dict(load_native_weights(state.items(), native, loaded))
    check_native_loaded(native, loaded)
    assert not any(".mlp.experts." in k for k in rest) and len(rest) + len(loaded) == len(state)
    g = torch.Generator().manual_seed(1)
    for layer in find_moe_layers(model):
        x = torch.randn(40, model.config.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])
        w = torch.rand(40, 2, generator=g)
        with torch.no_grad():
            want = layer.experts(x, ids, w)
            got = native[layer.index][1](x, ids.to(torch.int32).long(), w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert want.abs().sum() > 0


def test_bad_native_checkpoints_stop_in_one_line(tmp_path):
    model, config, state = _saved(tmp_path, "qwen2_moe", False)
    cases = [({k: v for k, v in state.items() if not k.endswith("layers.2.mlp.experts.up_b")}, "lacks .*layers.2.*up_b"),
             ({**state, "model.layers.0.mlp.experts.base_down": torch.zeros(3, 4)}, r"shape \(3, 4\)")]
    for tensors, message in cases:
        native, loaded = _native(config, model.config.hidden_size), set()
        with pytest.raises(LayoutError, match=message) as err:
            list(load_native_weights(tensors.items(), native, loaded))
            check_native_loaded(native, loaded)
        assert "\n" not in str(err.value)


def test_the_serving_mode_variable_takes_two_values_and_refuses_others_in_one_line(monkeypatch):
    from moetrim.integrations.vllm_plugin.replaced_native import MODE_ENV, requested_reconstruction

    for value, want in (("", False), ("native", False), ("Reconstructed", True)):
        monkeypatch.setenv(MODE_ENV, value)
        assert requested_reconstruction() is want
    monkeypatch.setenv(MODE_ENV, "reconstruct")
    with pytest.raises(LayoutError) as err:
        requested_reconstruction()
    assert "\n" not in str(err.value) and "'reconstruct'" in str(err.value) and "native" in str(err.value)


@pytest.mark.parametrize("tokens", [3, 40])  # the CPU's host walk (few slots) and the grouped path
@pytest.mark.parametrize("novices", [False, True])
def test_leaving_the_kept_experts_out_adds_exactly_their_share_less(tmp_path, tokens, novices):
    """kept=False (the plugin runs kept experts in vLLM's stock kernel): the output is the whole layer's minus
    the kept experts' weighted outputs, computed here expert by expert from their stored tensors."""
    model, _, _ = _saved(tmp_path, "qwen3_moe", novices)
    layer = find_moe_layers(model)[1]
    experts = layer.experts
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, model.config.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    kept_share = torch.zeros_like(x)
    for t in range(tokens):
        for s in range(2):
            e = int(ids[t, s])
            if e in experts.kept:
                u = experts.kept.index(e)
                gu = experts.kept_gate_up[u] @ x[t]
                h = F.silu(gu[:experts.width]) * gu[experts.width:]
                kept_share[t] += w[t, s] * (experts.kept_down[u] @ h)
    with torch.no_grad():
        whole = experts(x, ids, w)
        rest = experts(x, ids, w, kept=False)
    assert kept_share.abs().sum() > 0
    torch.testing.assert_close(rest + kept_share, whole, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the kept stacks are never read: the plugin drops them
        experts.kept_gate_up, experts.kept_down = None, None
        torch.testing.assert_close(experts(x, ids, w, kept=False), rest)
