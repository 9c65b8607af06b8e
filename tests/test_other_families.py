"""Families the project never special-cased go through the one generic path."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moetrim
from moetrim.calibrate import calibrate
from moetrim.plan import make_plan

from helpers import masked_model_logits, run_logits

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
OTHER = {
    # correction bias nested in a child module, shaped [1, E]; softmax routing with a bias
    "ernie4_5_moe": dict(moe_intermediate_size=32, intermediate_size=96, moe_num_experts=8, moe_num_shared_experts=1,
                         moe_k=2, moe_layer_start_index=0, moe_layer_end_index=1, moe_layer_interval=1),
    # sigmoid routing with an expert-bias buffer on the block, dense first layer
    "lfm2_moe": dict(moe_intermediate_size=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                     num_dense_layers=1, layer_types=["full_attention", "full_attention"]),
    # router logits from a child nn.Linear, expert bias passed in by the block
    "afmoe": dict(moe_intermediate_size=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                  num_dense_layers=1, num_shared_experts=1, head_dim=16),
    # router weight in gate.wg
    "hunyuan_v1_moe": dict(intermediate_size=32, num_experts=8, moe_topk=2, head_dim=16),
}


@pytest.mark.parametrize("family", sorted(OTHER))
def test_unnamed_family_compresses_exactly(family, tmp_path):
    cfg = AutoConfig.for_model(family, **{**BASE, **OTHER[family]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in moetrim.find_moe_layers(model):
            layer.router_weight.normal_(0, 0.1)
    ids = torch.randint(3, 127, (2, 20), generator=torch.Generator().manual_seed(1))
    prof = calibrate(model, [ids], seq_len=20)
    for granularity, criterion in (("dims", "fisher"), ("experts", "reap")):
        m = copy.deepcopy(model)
        plan = make_plan(m, prof, granularity=granularity, criterion=criterion, ratio=0.5)
        expected = masked_model_logits(model, plan, ids)
        res = moetrim.apply_plan(m, plan)
        assert torch.allclose(run_logits(m, ids), expected, atol=1e-5, rtol=0)
        if granularity == "experts":
            assert res.format == "standard"
        out = moetrim.save(m, tmp_path / f"{granularity}")
        assert torch.equal(run_logits(moetrim.load(out), ids), run_logits(m, ids))


def test_dense_dispatch_family_is_refused_clearly():
    cfg = AutoConfig.for_model("llama4_text", **{**BASE, "intermediate_size": 32, "intermediate_size_mlp": 64,
                                                 "num_local_experts": 4, "num_experts_per_tok": 1, "head_dim": 16})
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(moetrim.MoetrimError, match="unsupported MoE layout in llama4_text.*Llama4TextExperts"):
        moetrim.find_moe_layers(model)
