"""The 2026 methods on the one profile: AIMER (experts, no data), CAMERA-P (dims), each against a hand
computation from the model's own tensors."""

from __future__ import annotations

import pytest
import torch

from moetrim import criteria
from moetrim.assets.tiny import tiny_model
from moetrim.calibrate import calibrate
from moetrim.model.view import find_moe_layers
from moetrim.plan import make_plan


@pytest.fixture(scope="module")
def qwen3():
    m = tiny_model("qwen3_moe", num_hidden_layers=2, seed=4)
    ids = torch.randint(0, 127, (4, 32), generator=torch.Generator().manual_seed(5))
    return m, calibrate(m, [ids], seq_len=32, batch_size=2, fisher=False)


def _fused(model, layer_index: int):
    experts = model.model.layers[layer_index].mlp.experts
    return experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()  # [E, 2I, H], [E, H, I]


def test_aimer_is_one_minus_the_pooled_l1_over_l2_ratio(qwen3):
    model, _ = qwen3
    for layer in find_moe_layers(model):
        gate_up, down = _fused(model, layer.index)
        want = []
        for e in range(layer.num_experts):
            theta = torch.cat([gate_up[e].flatten(), down[e].flatten()])
            n = theta.numel()
            want.append(1 - (theta.abs().sum() / n) / (theta.pow(2).sum() / n).sqrt())
        got = criteria.score("aimer", "expert", None, layer)
        assert torch.allclose(got, torch.stack(want), rtol=1e-6, atol=0), layer.index


def test_aimer_plans_without_data_and_prunes_the_flattest_experts(qwen3):
    model, _ = qwen3
    layers = find_moe_layers(model)
    with torch.no_grad():  # make expert 3 of layer 0 heavy-tailed: a few large weights, the rest tiny
        experts = model.model.layers[layers[0].index].mlp.experts
        saved = experts.gate_up_proj[3].clone(), experts.down_proj[3].clone()
        experts.gate_up_proj[3].mul_(1e-3)
        experts.gate_up_proj[3, 0, :4] = 1.0
        experts.down_proj[3].mul_(1e-3)
    try:
        plan = make_plan(model, None, granularity="experts", criterion="aimer", ratio=0.5)
        assert plan.allocation == "layer" and plan.profile_digest is None
        for lp, layer in zip(plan.layers, layers):
            scores = criteria.score("aimer", "expert", None, layer)
            removed = sorted(set(range(layer.num_experts)) - set(lp.kept_experts))
            assert len(removed) == layer.num_experts // 2
            assert scores[removed].max() <= scores[lp.kept_experts].min()  # every removed expert is flatter than every kept one
        assert 3 in plan.layers[0].kept_experts
    finally:
        with torch.no_grad():
            experts.gate_up_proj[3].copy_(saved[0])
            experts.down_proj[3].copy_(saved[1])


def test_camera_score_is_down_energy_times_gated_energy_and_peak(qwen3):
    model, prof = qwen3
    for layer in find_moe_layers(model):
        _, down = _fused(model, layer.index)
        col = down.pow(2).sum(1)  # [E, I]: ||down[:, j]||^2
        sq = prof.get(layer.index, "gated_act_sq_sum").double()
        peak = prof.get(layer.index, "gated_act_abs_max").double() ** 2
        want = col * (0.1 * sq + 0.9 * peak)
        got = criteria.score("camera", "dim", prof, layer)
        assert torch.allclose(got, want, rtol=1e-6), layer.index
        assert float(got.max()) > 0


def test_camera_plans_per_layer_without_a_width_floor(qwen3):
    model, prof = qwen3
    plan = make_plan(model, prof, granularity="dims", criterion="camera", ratio=0.5)
    assert plan.allocation == "layer" and plan.min_width == 0
    for lp, layer in zip(plan.layers, find_moe_layers(model)):
        removed = 1 - sum(lp.widths) / (layer.num_experts * layer.widths[0])
        assert abs(removed - 0.5) <= 1 / (layer.num_experts * layer.widths[0]) + 1e-9  # the same ratio in every layer
        scores = criteria.score("camera", "dim", prof, layer)
        kept = torch.zeros_like(scores, dtype=torch.bool)
        for e, dims in zip(lp.kept_experts, lp.kept_dims):
            kept[e, dims] = True
        assert scores[~kept].max() <= scores[kept].min()  # ranked jointly across the layer's experts
    asked = make_plan(model, prof, granularity="dims", criterion="camera", ratio=0.5, allocation="global", min_width=2)
    assert asked.allocation == "global" and asked.min_width == 2  # the user's choice wins


def test_camera_refuses_a_profile_from_before_its_statistics(qwen3):
    from moetrim.calibrate.profile import Profile
    from moetrim.errors import UsageError

    model, prof = qwen3
    old = Profile({k: v for k, v in prof.stats.items() if not k.endswith(("gated_act_sq_sum", "gated_act_abs_max"))}, dict(prof.meta))
    old.validate()  # older profiles still load
    with pytest.raises(UsageError, match="older moetrim; recalibrate"):
        make_plan(model, old, granularity="dims", criterion="camera", ratio=0.5)


# -- MoNE: novices ------------------------------------------------------------------------------
def test_mone_score_is_mean_gate_times_output_spread(qwen3):
    model, prof = qwen3
    layer = find_moe_layers(model)[0]
    got = criteria.score("mone", "expert", prof, layer)
    tokens = float(prof.get(layer.index, "tokens").reshape(()))
    n = prof.get(layer.index, "count").double()
    mean = prof.get(layer.index, "out_sum").double() / n[:, None]
    var = (prof.get(layer.index, "norm_sq_sum").double() - n * mean.pow(2).sum(1)) / (n - 1)
    want = prof.get(layer.index, "gate_sum").double() / tokens * var.sqrt()
    routed = n > 1
    assert routed.sum() >= 2 and torch.allclose(got[routed], want[routed], rtol=1e-6)


@pytest.mark.parametrize("tokens", [3, 40])  # the CPU host walk (<= 32 slots) and the grouped path
def test_novices_add_their_routing_weight_times_a_constant(tokens):
    from moetrim.apply.replace import build_replaced

    model = tiny_model("qwen3_moe", num_hidden_layers=1, seed=6)
    layer = find_moe_layers(model)[0]
    E, H = layer.num_experts, layer.hidden_size
    novices, kept = [1, 4], [e for e in range(E) if e not in (1, 4)]
    vectors = torch.randn(2, H, generator=torch.Generator().manual_seed(1))
    mod = build_replaced(layer, kept, [], 0, novices=novices, novice_out=vectors)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen)
    k = layer.top_k
    rows = []
    for t in range(tokens):
        perm = torch.randperm(E, generator=gen).tolist()
        first = {0: 1, tokens - 1: 4}.get(t)  # both novices are picked
        rows.append(([first] if first is not None else []) + [e for e in perm if e != first][: k - (first is not None)])
    index = torch.tensor(rows)
    weights = torch.rand(tokens, k, generator=gen)
    want = torch.zeros(tokens, H)
    for t in range(tokens):
        for s in range(k):
            e, g = int(index[t, s]), float(weights[t, s])
            if e in novices:
                want[t] += g * vectors[novices.index(e)]
            else:
                w = layer.expert(e)
                h = torch.nn.functional.silu(x[t] @ w.gate.T) * (x[t] @ w.up.T)
                want[t] += g * (h @ w.down.T)
    with torch.no_grad():
        got = mod(x, index, weights)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert mod.param_count() == sum(p.numel() for p in mod.parameters())


def test_novice_gradients_ignore_the_undefined_padding_rows(monkeypatch):
    """A novice's slot sits in a grouped-GEMM padding row, whose values are undefined: poison those rows
    with NaN (what uninitialised memory may hold) and the forward and every gradient must still equal the
    per-token reference (recovery of a MoNE model once diverged at step 22 from exactly this)."""
    from moetrim.apply.replace import build_replaced
    from moetrim.model import replaced as rep

    real = rep._gmm

    def poisoned(x, w, ends):
        y = real(x, w, ends)
        return torch.where((torch.arange(y.shape[0]) < ends[-1])[:, None], y, float("nan"))

    monkeypatch.setattr(rep, "_gmm", poisoned)
    model = tiny_model("qwen3_moe", num_hidden_layers=1, seed=6)
    layer = find_moe_layers(model)[0]
    E, H, k, T = layer.num_experts, layer.hidden_size, layer.top_k, 40
    novices = [1, 4]
    mod = build_replaced(layer, [e for e in range(E) if e not in novices], [], 0, novices=novices,
                         novice_out=torch.randn(2, H, generator=torch.Generator().manual_seed(1)))
    gen = torch.Generator().manual_seed(2)
    rows = []
    for t in range(T):  # every third token routes a slot to novice 1, the next to novice 4
        first = (1, 4, None)[t % 3]
        rest = [e for e in torch.randperm(E, generator=gen).tolist() if e != first]
        rows.append(([first] if first is not None else []) + rest[: k - (first is not None)])
    index = torch.tensor(rows)
    x0 = torch.randn(T, H, generator=gen)
    w0 = torch.rand(T, k, generator=gen)

    def grads(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = fn(x, w)
        out.square().sum().backward()
        return out.detach(), x.grad, w.grad, mod.novice_out.grad.clone()

    got = grads(lambda x, w: mod(x, index, w))
    mod.novice_out.grad = None

    def reference(x, w):
        rows = []
        for t in range(T):
            acc = 0
            for s in range(k):
                e = int(index[t, s])
                if e in novices:
                    acc = acc + w[t, s] * mod.novice_out[novices.index(e)]
                else:
                    ew = layer.expert(e)
                    acc = acc + w[t, s] * ((torch.nn.functional.silu(x[t] @ ew.gate.T) * (x[t] @ ew.up.T)) @ ew.down.T)
            rows.append(acc)
        return torch.stack(rows)

    want = grads(reference)
    for g, r in zip(got, want):
        assert torch.isfinite(g).all()
        assert torch.allclose(g, r, atol=1e-4, rtol=1e-3)


def test_novice_plan_builds_saves_and_loads(qwen3, tmp_path):
    import copy

    import moetrim
    from moetrim.apply import apply_plan
    from moetrim.checkpoint import load_model
    from moetrim.plan import make_plan as plan_any

    model, prof = qwen3
    m = copy.deepcopy(model)
    plan = plan_any(m, prof, granularity="novice", ratio=0.5)
    assert plan.criterion == "mone"
    for lp, layer in zip(plan.layers, find_moe_layers(m)):
        scores = criteria.score("mone", "expert", prof, layer)
        assert len(lp.novices) == layer.num_experts // 2
        assert scores[lp.novices].max() <= scores[lp.kept].min()
    assert plan.removed_fraction < 0.5 and plan.removed_fraction > 0.49  # the novices' vectors are stored
    apply_plan(m, plan, prof)
    ids = torch.randint(0, 127, (2, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = m(ids).logits
    moetrim.save(m, tmp_path / "nov", plan=plan, profile=prof)
    back = load_model(tmp_path / "nov")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, before)
    experts = back.model.layers[0].mlp.experts
    from moetrim.plan.cluster import mean_outputs

    assert torch.allclose(experts.novice_out.double(), mean_outputs(prof, 0)[plan.layers[0].novices].to(experts.novice_out.dtype).double())


# -- REAM ---------------------------------------------------------------------------------------
def test_ream_signatures_and_groups_follow_the_formulas(qwen3):
    from moetrim.plan import ream

    _, prof = qwen3
    m = prof.get(0, "moments").double()
    sal = ream.saliency(prof, 0)
    routed = m[:, 0, 0] > 0
    assert torch.allclose(sal[routed], m[routed, 2, 1] / m[routed, 0, 0])
    out = torch.nn.functional.normalize(prof.get(0, "gated_out_sum").double(), dim=1)
    gram = prof.get(0, "logit_gram").double()
    cols = gram / gram.diagonal().sqrt()[:, None] / gram.diagonal().sqrt()[None, :]
    r = (2 - 2 * cols).clamp(min=0).sqrt()
    want = 1 - (((out @ out.T) + 1) / 2 + 1 - r / r.max()) / 2
    assert torch.allclose(ream.distances(prof, 0), want, atol=1e-9)
    # centroids are the most salient; the most salient centroid takes its nearest free experts first
    sal = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0, 0.2])
    dist = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    dist[0, 5], dist[0, 3], dist[0, 1] = 0.0, 0.01, 0.9
    groups = ream.groups(sal, dist, keep=3, group_size=3)
    assert [g[0] for g in groups] == [0, 2, 4] and groups[0] == [0, 5, 3] and sorted(e for g in groups for e in g) == list(range(6))
    assert groups[1] == [2, 1] and groups[2] == [4]


def test_ream_matches_a_permuted_copy_back_onto_its_centroid(qwen3, tmp_path):
    import copy

    import moetrim
    from moetrim.apply.ream import merged_group, neuron_features
    from moetrim.plan import make_plan as plan_any

    model, prof = qwen3
    m = copy.deepcopy(model)
    layer = find_moe_layers(m)[0]
    experts = m.model.layers[0].mlp.experts
    I = layer.widths[0]
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # expert 5 is expert 2 with its neurons shuffled: the same function
        experts.gate_up_proj[5] = torch.cat([experts.gate_up_proj[2, :I][perm], experts.gate_up_proj[2, I:][perm]])
        experts.down_proj[5] = experts.down_proj[2][:, perm]
    gate, up, down = merged_group(layer, [2, 5], [0.3, 0.7], neuron_features(layer))
    w = layer.expert(2)
    assert torch.allclose(gate, w.gate.double(), atol=1e-6) and torch.allclose(down, w.down.double(), atol=1e-6)
    E = layer.num_experts
    original = copy.deepcopy(m)
    plan = plan_any(m, prof, granularity="ream", ratio=0.5)
    assert plan.removed_fraction == 0.5 and all(len(l.groups) == E // 2 for l in plan.layers)
    groups = plan.layers[0].groups
    moetrim.apply_plan(m, plan, prof)
    assert m.config.num_experts == E // 2
    kept = sorted(g[0] for g in groups)
    new, old = find_moe_layers(m)[0], find_moe_layers(original)[0]
    for g in groups:
        got, was = new.expert(kept.index(g[0])), old.expert(g[0])
        assert torch.equal(got.up, was.up) == (len(g) == 1)  # a centroid nobody joined is kept as it was; the others change
    moetrim.save(m, tmp_path / "ream", plan=plan)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ream")  # a standard checkpoint
    ids = torch.randint(0, 127, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, m(ids).logits, atol=1e-5)


# -- --method auto ------------------------------------------------------------------------------
def test_auto_allocation_is_the_cheapest_mix_that_meets_the_budget():
    import itertools

    from moetrim.plan.auto import Option, allocate

    gen = torch.Generator().manual_seed(9)
    total = 4 * 1000
    options = {}
    for layer in range(4):
        opts = [Option("keep", 0.0, 0, 0.0)]
        for r in (0.25, 0.5, 0.75):
            for method, scale in (("a", 1.0), ("b", 1.0 + float(torch.rand(1, generator=gen)))):
                opts.append(Option(method, r, int(r * 1000), scale * r ** 2 * float(1 + torch.rand(1, generator=gen)) * (layer + 1)))
        options[layer] = opts
    for target in (1000, 2000, 2500, 3000):
        got = allocate(options, target, total)
        assert sum(o.removed for o in got.values()) >= target
        brute = min((sum(o.cost for o in combo), combo) for combo in itertools.product(*options.values())
                    if sum(o.removed for o in combo) >= target)
        assert sum(o.cost for o in got.values()) == pytest.approx(brute[0], rel=1e-12)
    from moetrim.errors import UsageError

    with pytest.raises(UsageError, match="unreachable"):
        allocate(options, 3500, total)


def test_auto_plan_keeps_the_lowest_kl_and_says_why(qwen3, tmp_path):
    import copy
    import re

    import moetrim
    from moetrim.plan import load_plan
    from moetrim.plan.auto import make_auto_plan

    model, prof = qwen3
    prof = calibrate(model, [torch.randint(0, 127, (4, 32), generator=torch.Generator().manual_seed(5))], seq_len=32, batch_size=2)
    batches = [torch.randint(0, 127, (2, 32), generator=torch.Generator().manual_seed(s)) for s in (11, 12)]
    grid = (0.25, 0.5, 0.75)  # a coarser grid than the default keeps the test short
    plan = make_auto_plan(model, prof, batches, ratio=0.5, grid=grid)
    again = make_auto_plan(model, prof, batches, ratio=0.5, grid=grid)
    assert plan.to_json() == again.to_json()  # same inputs, same plan
    assert plan.removed_fraction >= 0.5 - 1e-9 and plan.removed_fraction <= 0.5 + plan.ratio_tolerance
    guard = next(n for n in plan.notes if n.startswith("auto:"))
    kls = {name: float(v) for name, v in re.findall(r"(auto \(per-layer allocation\)|[a-z]+:[a-z]+ alone) ([0-9.e+-]+)", guard)}
    # every candidate alone that plans here (merge needs dense outputs this profile lacks; rank-16 corrections
    # store more than a tiny expert holds, so replace cannot reach 50%)
    assert set(kls) == {"auto (per-layer allocation)", "dims:fisher alone", "dims:camera alone", "experts:reap alone", "novice:mone alone"}
    assert guard.endswith(f"chosen: {min(kls, key=kls.get)}")
    assert sum(n.startswith("layer ") for n in plan.notes) == len(find_moe_layers(model))
    m = copy.deepcopy(model)
    moetrim.apply_plan(m, plan)
    with torch.no_grad():  # the guard's KL of the chosen plan, by hand: mean over tokens of KL(dense ‖ compressed)
        p = torch.cat([torch.log_softmax(model(input_ids=b).logits.double(), -1).flatten(0, 1) for b in batches])
        q = torch.cat([torch.log_softmax(m(input_ids=b).logits.double(), -1).flatten(0, 1) for b in batches])
        by_hand = float((p.exp() * (p - q)).sum(-1).mean())
    assert by_hand > 1e-5 and by_hand == pytest.approx(kls[min(kls, key=kls.get)], rel=2e-3)
    plan.save(tmp_path / "auto.json")
    assert load_plan(tmp_path / "auto.json").to_json() == plan.to_json()  # a plan file moetrim apply reads back
