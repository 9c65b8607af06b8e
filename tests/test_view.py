"""The model view finds every MoE layer, skips dense ones, and names what it cannot handle."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moetrim
from moetrim.assets.tiny import FAMILIES, tiny_model
from moetrim.model.view import find_moe_layers

EXPECTED_LAYERS = {"qwen2_moe": [0, 2], "deepseek_v2": [1, 2], "deepseek_v3": [1, 2]}


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_found_and_dense_layers_skipped(family):
    model = tiny_model(family)
    layers = find_moe_layers(model)
    assert [l.index for l in layers] == EXPECTED_LAYERS.get(family, [0, 1, 2])
    for l in layers:
        assert l.num_experts == 8 and l.top_k == 2 and l.widths == [32] * 8
        w = l.expert(3)
        assert w.up.shape == (32, 64) and w.down.shape == (64, 32)
    assert layers[0].routing == ("sigmoid" if family == "deepseek_v3" else "softmax")
    if family == "gpt_oss":
        assert layers[0].has_bias and layers[0].expert(0).gate_bias.shape == (32,)


def test_gpt_oss_interleaved_layout_views():
    """Canonical gate/up views of GPT-OSS come from the interleaved, transposed storage."""
    l = find_moe_layers(tiny_model("gpt_oss"))[0]
    raw = l.experts.gate_up_proj[2]  # [H, 2I], gate at even columns
    w = l.expert(2)
    assert torch.equal(w.gate, raw[:, 0::2].t()) and torch.equal(w.up, raw[:, 1::2].t())


def test_qwen3_mlp_only_layers_and_sparse_step():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0], decoder_sparse_step=1, num_hidden_layers=4)
    assert [l.index for l in find_moe_layers(model)] == [1, 2, 3]
    model = tiny_model("qwen2_moe", mlp_only_layers=[], decoder_sparse_step=2, num_hidden_layers=4)
    assert [l.index for l in find_moe_layers(model)] == [1, 3]


def test_other_family_through_generic_path():
    """A family this project never named (GLM4-MoE: sigmoid, correction bias, shared experts)."""
    cfg = AutoConfig.for_model(
        "glm4_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, moe_intermediate_size=32, intermediate_size=96, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, head_dim=16,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    layers = find_moe_layers(model)
    assert [l.index for l in layers] == [1] and layers[0].routing == "sigmoid"


def test_dense_model_is_a_clear_error():
    cfg = AutoConfig.for_model("qwen2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=64, intermediate_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(moetrim.MoetrimError, match="no MoE layers.*Qwen2MLP"):
        find_moe_layers(model)


def test_unknown_experts_layout_is_a_clear_error():
    model = tiny_model("mixtral")

    class OldStyleExperts(torch.nn.ModuleList):
        pass

    for layer in model.model.layers:
        layer.mlp.experts = OldStyleExperts([torch.nn.Linear(4, 4)])
    with pytest.raises(moetrim.MoetrimError, match="unsupported MoE layout.*OldStyleExperts"):
        find_moe_layers(model)
