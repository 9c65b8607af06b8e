"""The variable-width experts module: same function as stock, packed storage, trainable."""

from __future__ import annotations

import copy

import pytest
import torch

import moetrim
from moetrim.model.varwidth import VariableWidthExperts
from moetrim.model.view import find_moe_layers
from moetrim.plan import make_plan
from moetrim.tiny import FAMILIES, tiny_model

from helpers import run_logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_varwidth_equals_stock(family):
    base = tiny_model(family)
    m = copy.deepcopy(base)
    plan = make_plan(m, None, criterion="random", ratio=0.0)
    assert moetrim.apply_plan(m, plan, force_varwidth=True).format == "varwidth"
    assert all(isinstance(l.experts, VariableWidthExperts) for l in find_moe_layers(m))
    ids = torch.randint(0, 127, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(run_logits(m, ids), run_logits(base, ids), atol=1e-5, rtol=0)


def test_packed_storage_has_no_padding():
    m = tiny_model("qwen3_moe")
    plan = make_plan(m, None, criterion="random", ratio=0.5, allocation="global", seed=1)
    moetrim.apply_plan(m, plan)
    for layer, lp in zip(find_moe_layers(m), plan.layers):
        ex = layer.experts
        assert ex.gate_up.shape == (2 * sum(lp.widths), 64) and ex.down_blocks.shape == (sum(lp.widths) * 64,)
        assert ex.gate_up.is_contiguous() and ex.down_blocks.is_contiguous()
        w = ex.expert_weights(3)  # views into the packed storage, not copies
        assert w.gate.data_ptr() >= ex.gate_up.data_ptr() and w.down.data_ptr() >= ex.down_blocks.data_ptr() and w.down.is_contiguous()
    assert moetrim.routed_expert_param_count(m) == plan.params_after


def test_backward_through_varwidth_matches_masked_stock():
    """Training works: gradients of kept weights equal those of the stock model with removed dims masked."""
    base = tiny_model("mixtral")
    plan = make_plan(base, None, criterion="random", ratio=0.5, allocation="global", seed=2)
    m = copy.deepcopy(base)
    moetrim.apply_plan(m, plan)
    ids = torch.randint(0, 127, (2, 16), generator=torch.Generator().manual_seed(3))
    m.train()
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    layer = find_moe_layers(m)[0]
    assert layer.experts.gate_up.grad is not None and layer.experts.gate_up.grad.abs().sum() > 0
    # masked stock reference: zero the removed down columns, compare the kept down-column gradient
    ref = copy.deepcopy(base)
    ref.set_experts_implementation("eager")
    with torch.no_grad():
        for lp in plan.layers:
            for e, dims in zip(lp.kept_experts, lp.kept_dims):
                drop = [j for j in range(32) if j not in set(dims)]
                ref.model.layers[lp.layer].mlp.experts.down_proj[e][:, drop] = 0
    lp = plan.layers[0]
    ref.train()
    ref(input_ids=ids, labels=ids).loss.backward()
    g_ref = ref.model.layers[0].mlp.experts.down_proj.grad  # [E, H, I]
    e = lp.kept_experts[1]
    dims = torch.tensor(lp.kept_dims[1])
    o = layer.experts.offsets[1]
    H = layer.experts.hidden_dim
    g_ours = layer.experts.down_blocks.grad[o * H : (o + len(dims)) * H].view(H, len(dims))  # [H, w]
    assert torch.allclose(g_ours, g_ref[e][:, dims], atol=1e-6, rtol=1e-4)


def test_shared_copy_compresses_without_touching_the_original():
    from moetrim.apply import shared_copy

    base = tiny_model("qwen2_moe")
    before = {n: p.clone() for n, p in base.named_parameters()}
    m = shared_copy(base)
    assert m.model.embed_tokens.weight is base.model.embed_tokens.weight
    moetrim.apply_plan(m, make_plan(m, None, criterion="random", ratio=0.5, allocation="global"))
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())
    assert moetrim.routed_expert_param_count(m) < moetrim.routed_expert_param_count(base)


def test_one_token_fast_path_matches_dispatch():
    m = tiny_model("olmoe")
    moetrim.apply_plan(m, make_plan(m, None, criterion="random", ratio=0.5, allocation="global", seed=4))
    ex = find_moe_layers(m)[0].experts
    x = torch.randn(3, 64)
    idx = torch.tensor([[1, 5], [7, 0], [2, 2 + 1]])
    w = torch.rand(3, 2)
    with torch.no_grad():
        batched = ex(x, idx, w)
        single = torch.cat([ex(x[i : i + 1], idx[i : i + 1], w[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-6, rtol=0)
