"""The variable-width experts module: same function as stock, packed storage, trainable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import moetrim
from moetrim.assets.tiny import FAMILIES, tiny_model
from moetrim.model.varwidth import VariableWidthExperts
from moetrim.model.view import find_moe_layers
from moetrim.plan import make_plan

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
    o = layer.experts.offsets[layer.experts.block_of_expert[1]]  # expert 1's block in the width-sorted storage
    H = layer.experts.hidden_dim
    g_ours = layer.experts.down_blocks.grad[o * H : (o + len(dims)) * H].view(H, len(dims))  # [H, w]
    assert torch.allclose(g_ours, g_ref[e][:, dims], atol=1e-6, rtol=1e-4)


def test_shared_copy_compresses_without_touching_the_original():
    from moetrim.apply.slicing import shared_copy

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


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_few_token_and_many_token_dispatch_agree(family, monkeypatch):
    """Decode-sized calls take a gather/unsort path, prefill-sized ones scatter-add: same outputs and gradients."""
    import moetrim.model.varwidth as vw

    m = tiny_model(family)
    moetrim.apply_plan(m, make_plan(m, None, criterion="random", ratio=0.5, allocation="global", seed=5))
    ex = find_moe_layers(m)[0].experts
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 64, generator=g)
    idx = torch.stack([torch.randperm(ex.num_experts, generator=g)[:2] for _ in range(9)])
    w = torch.rand(9, 2, generator=g)

    def run():
        ex.zero_grad()
        out = ex(x, idx, w)
        out.pow(2).sum().backward()
        return out.detach(), ex.gate_up.grad.clone(), ex.down_blocks.grad.clone()

    small = run()
    monkeypatch.setattr(vw, "_SMALL_DISPATCH", 0)
    large = run()
    for a, b in zip(small, large):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _module(widths, hidden=32, seed=0, dtype=torch.float32, gated=True, has_bias=False, layout="by_width"):
    """A packed module with the stock gated-SiLU activation (GELU when not gated) and random weights."""
    from moetrim.model.view import _GatedActivation

    act = _GatedActivation(torch.nn.SiLU()) if gated else (lambda gate, up: torch.nn.functional.gelu(up))
    ex = VariableWidthExperts(widths, hidden, act, dtype=dtype, gated=gated, has_bias=has_bias, layout=layout)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.3)
    return ex


def _routing(n_tokens, n_experts, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n_tokens)])
    return torch.randn(n_tokens, 32, generator=g), idx, torch.rand(n_tokens, k, generator=g)


@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("widths", [[8] * 6, [8, 8, 8, 12, 16, 16, 4, 4], [3, 5, 7, 9, 11, 13], [6, 6, 6, 10, 10]])
def test_inference_paths_equal_the_training_path(widths, tokens, monkeypatch):
    """Without gradients the module uses cached views and one grouped GEMM per run of equal widths;
    with them, fresh per-expert views. Both compute the same function, in every dispatch regime."""
    import moetrim.model.varwidth as vw

    if tokens == 40:
        monkeypatch.setattr(vw, "_SMALL_DISPATCH", 0)  # the many-token scatter-add path
    ex = _module(widths)
    x, idx, w = _routing(tokens, len(widths), 3)
    train = ex(x, idx, w)
    assert train.requires_grad
    with torch.inference_mode():
        infer = ex(x, idx, w)
    with torch.no_grad():
        no_grad = ex(x, idx, w)
    assert torch.allclose(infer, train.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(infer, no_grad)
    monkeypatch.setattr(vw, "_GROUPED_DECODE_DEVICES", ("cpu",))  # few tokens: grouped runs, as on CUDA
    with torch.no_grad():
        assert torch.allclose(ex(x, idx, w), no_grad, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(VariableWidthExperts, "_grouped_ok", lambda self, x: False)
    with torch.no_grad():
        assert torch.allclose(ex(x, idx, w), no_grad, atol=1e-5, rtol=1e-5)


def test_runs_group_consecutive_equal_widths():
    assert _module([8, 8, 8, 12, 16, 16, 4], layout="by_expert").runs == [(0, 3, 8), (3, 1, 12), (4, 2, 16), (6, 1, 4)]


def test_width_sorted_blocks_put_equal_widths_together():
    """Blocks are stored widest first, ties in expert order, so equal widths form one run wherever the
    router numbers them; expert_weights still answers by expert id."""
    ex = _module([8, 16, 8, 12, 16, 8])
    assert ex.expert_of_block == [1, 4, 3, 0, 2, 5]
    assert [ex.expert_of_block[b] for b in ex.block_of_expert] == list(range(6))
    assert ex.runs == [(0, 2, 16), (2, 1, 12), (3, 3, 8)]
    assert [ex.expert_weights(e).width for e in range(6)] == ex.widths == [8, 16, 8, 12, 16, 8]
    assert ex.expert_weights(4).gate.data_ptr() == ex.gate_up.data_ptr() + 2 * 16 * 32 * 4  # block 1, after expert 1's rows


@pytest.mark.parametrize("tokens", [1, 6, 40])
@pytest.mark.parametrize("has_bias", [False, True])
def test_block_order_does_not_change_the_function(tokens, has_bias, monkeypatch):
    """The same experts stored by width and by expert id compute the same outputs and the same
    gradients (mapped back to experts), in every dispatch regime."""
    import moetrim.model.varwidth as vw

    if tokens == 40:
        monkeypatch.setattr(vw, "_SMALL_DISPATCH", 0)
    widths = [8, 16, 8, 12, 16, 8]
    by_expert = _module(widths, has_bias=has_bias, dtype=torch.float64, layout="by_expert")
    experts = [by_expert.expert_weights(e) for e in range(len(widths))]
    by_width = VariableWidthExperts.from_weights(
        experts, [torch.arange(w) for w in widths], by_expert.activation, gated=True, has_bias=has_bias
    )
    assert by_width.layout == "by_width" and by_width.expert_of_block != list(range(len(widths)))
    x, idx, w = _routing(tokens, len(widths), 3)
    x, w = x.double(), w.double()
    with torch.no_grad():
        assert torch.allclose(by_width(x, idx, w), by_expert(x, idx, w), atol=1e-12, rtol=1e-10)

    def grads(ex):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ex.zero_grad()
        ex(xx, idx, ww).square().sum().backward()
        names = ("gate", "up", "down") + (("gate_bias", "up_bias", "down_bias") if has_bias else ())
        per_expert = [getattr(ex.expert_weights(e), name) for e in range(len(widths)) for name in names]
        return [xx.grad, ww.grad] + [_grad_of_view(ex, t) for t in per_expert]

    for a, b in zip(grads(by_width), grads(by_expert)):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


def _grad_of_view(ex, view):
    """The gradient entries of a view into one of ex's packed parameters."""
    for p in ex.parameters():
        start = (view.data_ptr() - p.data_ptr()) // p.element_size()
        if 0 <= start < p.numel():
            return torch.as_strided(p.grad, view.shape, view.stride(), p.grad.storage_offset() + start)
    raise AssertionError("not a view of the packed storage")


def test_view_cache_follows_the_weights():
    """Cached views see in-place edits, and are rebuilt when a parameter gets new storage or dtype."""
    ex = _module([8, 8, 12, 16])
    x, idx, w = _routing(5, 4, 2)
    with torch.no_grad():
        before = ex(x, idx, w)
        ex.down_blocks.mul_(2)  # in place: same storage, the views see it
        assert torch.allclose(ex(x, idx, w), 2 * before, atol=1e-5, rtol=1e-5)
        ex.down_blocks.data = ex.down_blocks.data / 2  # new storage: the cache is rebuilt
        assert torch.allclose(ex(x, idx, w), before, atol=1e-6, rtol=1e-6)
        ex.to(torch.float64)
        out64 = ex(x.double(), idx, w.double())
    assert out64.dtype == torch.float64 and torch.allclose(out64.float(), before, atol=1e-5, rtol=1e-5)


def test_copies_do_not_carry_the_view_cache():
    ex = _module([8, 8, 12])
    x, idx, w = _routing(4, 3, 2)
    with torch.no_grad():
        before = ex(x, idx, w)
    assert "_view_cache" in ex.__dict__
    twin = copy.deepcopy(ex)
    assert "_view_cache" not in twin.__dict__
    with torch.no_grad():
        twin.gate_up.zero_()
        assert torch.equal(ex(x, idx, w), before) and twin(x, idx, w).abs().max() == 0


def test_views_cached_in_inference_mode_train_frozen_experts():
    """Gradients still reach the input (adapters, earlier layers) after the cache was built in
    inference mode, when the experts themselves are frozen."""
    ex = _module([8, 8, 12, 16])
    x, idx, w = _routing(5, 4, 2)
    with torch.inference_mode():
        ex(x, idx, w)
    ex.requires_grad_(False)
    x = x.clone().requires_grad_(True)
    ex(x, idx, w).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("widths,calls", [([8] * 6, 2), ([8, 8, 12, 16, 16], 4), ([6, 6, 6], 0), ([3, 5, 7], 0)])
def test_grouped_gemm_runs_where_widths_allow(widths, calls, monkeypatch):
    """Runs of equal widths go through one grouped GEMM per projection (16-byte strides needed), the rest
    through per-expert matmuls: on CUDA always, on CPU where the run's experts average fewer rows than
    the weight-major products want (here 18 slots over 3-6 experts: 3-6 rows each)."""
    import torch.nn.functional as F

    import moetrim.model.varwidth as vw

    seen = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: seen.append(1) or real(*a, **k))
    ex = _module(widths)
    x, idx, w = _routing(6, len(widths), 3)
    monkeypatch.setattr(vw, "_WEIGHT_MAJOR_MIN_ROWS", 1)  # every expert has enough rows: weight-major, no grouping
    with torch.no_grad():
        ex(x, idx, w)
    assert seen == []
    monkeypatch.setattr(vw, "_WEIGHT_MAJOR_MIN_ROWS", 7)
    with torch.no_grad():
        ex(x, idx, w)
    assert len(seen) == calls
    seen.clear()
    monkeypatch.setattr(vw, "_WEIGHT_MAJOR_MIN_ROWS", 1)
    monkeypatch.setattr(vw, "_GROUPED_DECODE_DEVICES", ("cpu",))  # as on CUDA: whatever the rows
    with torch.no_grad():
        ex(x, idx, w)
    assert len(seen) == calls


def _record_mm(monkeypatch) -> list:
    """Operand shapes of every torch.mm call from now on (the call itself still runs)."""
    shapes, real = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **k: shapes.append((tuple(a.shape), tuple(b.shape))) or real(a, b, **k))
    return shapes


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_cpu_products_run_weight_major_in_fp32(path, monkeypatch):
    """In fp32 on CPU, products with two or more tokens per expert multiply W @ x^T (the fast orientation
    there), in the few-token (decode) path and in the scatter-add (prefill) path; bf16 keeps x @ W^T
    (weight-major ran at a quarter to a third of the speed). Checked by the operands torch.mm sees, and
    against the token-major result."""
    import moetrim.model.varwidth as vw

    monkeypatch.setattr(vw, "_WEIGHT_MAJOR_MIN_ROWS", 2)  # (the row threshold has a test of its own)
    if path == "prefill":
        monkeypatch.setattr(vw, "_SMALL_DISPATCH", 0)
    ex = _module([8, 8, 12, 16])
    x, idx, w = _routing(6, 4, 3)  # 18 slots over 4 experts: every expert gets several tokens
    with torch.no_grad():
        ref = ex(x, idx, w)
    shapes = _record_mm(monkeypatch)
    with torch.no_grad():
        out = ex(x, idx, w)
    assert shapes and all(a[1] == 32 or a[0] == 32 for a, _ in shapes)  # weight first: [rows*I, H] or [H, I]
    assert all(b[1] > 1 for _, b in shapes)  # ... times the tokens as columns
    assert torch.equal(out, ref)
    shapes.clear()
    with torch.no_grad():
        _module([8, 8, 12, 16], dtype=torch.bfloat16)(x.bfloat16(), idx, w)
    assert shapes and all(a[0] <= x.shape[0] for a, _ in shapes)  # bf16: tokens first, [n, H] or [n, I]
    monkeypatch.setattr(VariableWidthExperts, "_weight_major_runner", VariableWidthExperts._runner)
    with torch.no_grad():
        assert torch.allclose(ex(x, idx, w), out, atol=1e-5, rtol=1e-5)


def test_few_rows_multiply_token_major_and_many_weight_major(monkeypatch):
    """CPU fp32: an expert with 2 to _WEIGHT_MAJOR_MIN_ROWS - 1 rows multiplies x @ W^T (token-major ran
    twice as fast there on torch 2.13), one with more W @ x^T; both give the same result."""
    import moetrim.model.varwidth as vw

    ex = _module([8, 12, 16])  # no equal widths: no grouped GEMMs
    for tokens in (2, 3, 5, 6, 9):
        x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(tokens))
        idx, w = torch.zeros(tokens, 1, dtype=torch.long), torch.ones(tokens, 1)  # every token on expert 0
        shapes = _record_mm(monkeypatch)
        with torch.no_grad():
            out = ex(x, idx, w)
        token_major = tokens < vw._WEIGHT_MAJOR_MIN_ROWS
        assert shapes[0][0] == ((tokens, 32) if token_major else (16, 32)), tokens  # x first, or gate_up [2*8, H]
        monkeypatch.undo()
        ref = ex.expert_weights(0)
        expect = (F.silu(x @ ref.gate.T) * (x @ ref.up.T)) @ ref.down.T
        assert torch.allclose(out, expect, atol=1e-5, rtol=1e-5)


def test_one_token_down_product_pairs_short_rows(monkeypatch):
    """One token, fp32 on CPU: a down block narrower than _PAIRED_DOWN_BELOW is multiplied as
    [H/2, 2w] against two columns, wider ones as a plain product; both give the token-major result."""
    import moetrim.model.varwidth as vw

    ex = _module([8, 12, 16, 16])
    x, idx, w = _routing(1, 4, 3)
    with torch.no_grad():
        paired = ex(x, idx, w)
    shapes = _record_mm(monkeypatch)
    with torch.no_grad():
        ex(x, idx, w)
    widths = [ex.widths[int(e)] for e in idx[0]]
    assert [s for s in shapes if s[1][1] == 2] == [((16, 2 * v), (2 * v, 2)) for v in widths]  # H/2 = 16 rows
    monkeypatch.setattr(vw, "_PAIRED_DOWN_BELOW", 0)
    shapes.clear()
    with torch.no_grad():
        plain = ex(x, idx, w)
    assert shapes and not [s for s in shapes if s[1][1] == 2]
    assert torch.allclose(paired, plain, atol=1e-6, rtol=1e-5)


def _reference(ex, x, idx, w):
    """Token by token, through autograd on the packed weights' own views."""
    rows = []
    for t in range(x.shape[0]):
        acc = 0
        for j in range(idx.shape[1]):
            ew = ex.expert_weights(int(idx[t, j]))
            up = x[t] @ ew.up.T + (ew.up_bias if ew.up_bias is not None else 0)
            gate = x[t] @ ew.gate.T + (ew.gate_bias if ew.gate_bias is not None else 0) if ew.gate is not None else None
            h = ex.activation(gate, up)
            acc = acc + w[t, j] * (h @ ew.down.T + (ew.down_bias if ew.down_bias is not None else 0))
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("routed", [5, 3])  # 3: experts 3 and 4 get no token, their gradient blocks are zero
@pytest.mark.parametrize("gated,has_bias", [(True, False), (True, True), (False, False), (False, True)])
def test_training_gradients_match_autograd(gated, has_bias, routed):
    """The one-node backward gives the gradients autograd gives through per-expert slices: for the
    input, the routing weights and every packed weight and bias (float64)."""
    ex = _module([3, 5, 5, 8, 2], gated=gated, has_bias=has_bias, dtype=torch.float64)
    x, idx, w = _routing(7, routed, 2)
    x, w = x.double().requires_grad_(True), w.double().requires_grad_(True)
    g = torch.randn(7, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def grads(fn):
        for p in [x, w, *ex.parameters()]:
            p.grad = None
        out = fn(ex, x, idx, w)
        out.backward(g)
        return [out.detach()] + [p.grad.clone() for p in [x, w, *ex.parameters()]]

    ours, ref = grads(lambda m, *a: m(*a)), grads(_reference)
    assert len(ours) == 3 + 2 + 2 * has_bias
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


def test_training_groups_equal_widths_across_an_expert_not_hit():
    """The backward runs the activation once per group of consecutive equal-width experts hit: an
    expert with no token between two of them does not split the group, one of another width does,
    and the gradients stay those of per-expert autograd."""
    from moetrim.model.varwidth_grad import _groups

    ex = _module([4, 6, 4, 4, 2, 4], dtype=torch.float64, has_bias=True, layout="by_expert")
    idx = torch.tensor([[0, 2], [3, 0], [2, 4], [5, 3]])  # expert 1 (width 6) gets no token; 4 (width 2) does
    groups = _groups(ex, torch.bincount(idx.flatten(), minlength=6).tolist())
    assert [(g.width, [m[0] for m in g.members]) for g in groups] == [(4, [0, 2, 3]), (2, [4]), (4, [5])]
    assert [(g.start, g.end) for g in groups] == [(0, 6), (6, 7), (7, 8)]
    # stored by width, the four width-4 experts are one group and the width-2 one comes last
    sorted_ex = _module([4, 6, 4, 4, 2, 4], dtype=torch.float64, layout="by_width")
    blocks = sorted_ex._to_blocks(idx)
    groups = _groups(sorted_ex, torch.bincount(blocks.flatten(), minlength=6).tolist())
    assert [(g.width, [sorted_ex.expert_of_block[m[0]] for m in g.members]) for g in groups] == [(4, [0, 2, 3, 5]), (2, [4])]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    params = [x, w, *ex.parameters()]
    ours = torch.autograd.grad(ex(x, idx, w).square().sum(), params)
    ref = torch.autograd.grad(_reference(ex, x, idx, w).square().sum(), params)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


def test_training_gradients_with_a_family_activation():
    """GPT-OSS's clamped, biased activation goes through the same backward."""
    m = tiny_model("gpt_oss")
    moetrim.apply_plan(m, make_plan(m, None, criterion="random", ratio=0.5, allocation="global", seed=3))
    ex = find_moe_layers(m)[0].experts.double()
    x, idx, w = _routing(6, ex.num_experts, 2)
    x = torch.randn(6, ex.hidden_dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    w = w.double().requires_grad_(True)
    ours = torch.autograd.grad(ex(x, idx, w).square().sum(), [x, w, ex.gate_up, ex.down_blocks])
    ref = torch.autograd.grad(_reference(ex, x, idx, w).square().sum(), [x, w, ex.gate_up, ex.down_blocks])
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral"])
def test_stock_silu_families_take_the_closed_form_backward(family):
    """Gated SiLU families are recognised, so their backward skips the local autograd graph."""
    from moetrim.model.view import make_activation

    assert make_activation(find_moe_layers(tiny_model(family))[0].experts).silu


def test_closed_form_silu_backward_equals_the_autograd_one(monkeypatch):
    """The closed-form gated-SiLU derivative and autograd through the activation agree (float64)."""
    ex = _module([3, 5, 5, 8, 2], has_bias=True, dtype=torch.float64)
    x, idx, w = _routing(7, 5, 2)

    def grads():
        xx, ww = x.double().requires_grad_(True), w.double().requires_grad_(True)
        return torch.autograd.grad(ex(xx, idx, ww).square().sum(), [xx, ww, *ex.parameters()])

    assert ex.activation.silu
    closed = grads()
    monkeypatch.setattr(ex.activation, "silu", False)
    local = grads()
    for a, b in zip(closed, local):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize(
    "widths,routed,grouped_runs",
    [
        ([8] * 6, 6, 1),  # 0% / uniform: one run is the whole layer, its products are the gradients
        ([8] * 6, 4, 1),  # blocks 4 and 5 get no token: zero-token groups inside the run
        ([8, 16, 8, 12, 16, 8], 6, 2),  # global widths: runs of 16 and 8, a lone 12 per expert
        ([6, 6, 6, 8, 8], 5, 1),  # width 6 breaks 16-byte strides in fp32: that run goes per expert
    ],
)
def test_training_through_grouped_gemms_equals_per_expert_products(widths, routed, grouped_runs, gated, monkeypatch):
    """In training, runs of equal widths go through one grouped GEMM per product (forward, input and
    weight gradients, the 2D x 2D form with offsets for the latter); the gradients equal those of the
    per-expert products, and blocks no token reached get zero gradient."""
    import torch.nn.functional as F

    ex = _module(widths, gated=gated)
    x, idx, w = _routing(12, routed, 3)
    g = torch.randn(12, 32, generator=torch.Generator().manual_seed(9))

    def grads():
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ex.zero_grad(set_to_none=True)
        out = ex(xx, idx, ww)
        out.backward(g)
        return [out.detach(), xx.grad, ww.grad, ex.gate_up.grad, ex.down_blocks.grad]

    seen = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: seen.append(a[0].dim() + a[1].dim()) or real(*a, **k))
    grouped = grads()
    assert len(seen) == 6 * grouped_runs and seen.count(4) == 2 * grouped_runs  # 2 forward, 4 backward, 2 of them 2D x 2D
    monkeypatch.setattr(VariableWidthExperts, "_grouped_ok", lambda self, x: False)
    seen.clear()
    per_expert = grads()
    assert not seen
    for a, b in zip(grouped, per_expert):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    for e in range(routed, len(widths)):
        assert not _grad_of_view(ex, ex.expert_weights(e).up).any() and not _grad_of_view(ex, ex.expert_weights(e).down).any()
