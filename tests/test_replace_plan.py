"""Replace plans (replace, naive, merge, D²-MoE) priced in stored parameters, and recovery training of
what they create: exact accounting, determinism, layouts, refusals, save/load; freezing, the blend and
KD schedules, refusals and hook removal."""

from __future__ import annotations

import math
import copy
import json
from dataclasses import asdict

import pytest
import torch

import moetrim
from moetrim import criteria
from moetrim.assets.tiny import tiny_model, tiny_tokenizer
from moetrim.apply.replace import apply_replace_plan
from moetrim.calibrate.profile import load_profile
from moetrim.model.replaced import ReplacedExperts
from moetrim.model.view import find_moe_layers
from moetrim.plan.replace import ReplacePlan, make_replace_plan
from moetrim.train import finetune
from moetrim.train.recovery import Recovery, parse_anneal

from helpers import run_logits

E, TOP_K, WIDTH = 8, 2, 32  # tiny qwen3_moe: 3 MoE layers of 8 experts (top-2), width 32, hidden 64
IDS = torch.randint(0, 127, (2, 24), generator=torch.Generator().manual_seed(11))
CREATED = ("base_gate_up", "base_down", "gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and two OpenMP threads on two busy cores run 40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base():
    return tiny_model("qwen3_moe")


@pytest.fixture(scope="module")
def prof(base, calib_ids):
    """Fisher, input Grams and every expert's outputs on every token."""
    return moetrim.calibrate(base, [calib_ids], seq_len=32, whiten=True, dense_outputs=True)


@pytest.fixture(scope="module")
def plain_prof(base, calib_ids):
    """Neither Fisher nor Grams."""
    return moetrim.calibrate(base, [calib_ids], seq_len=32, fisher=False)


def _applied(base, plan, prof):
    return apply_replace_plan(copy.deepcopy(base), plan, prof)


def _partition(lp):
    members = [e for g in lp.groups for e in g]
    return sorted(lp.kept + members) == list(range(E)) and len(set(lp.kept + members)) == E


# -- plans: accounting ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,ratio", [("replace", 0.3), ("replace", 0.45), ("naive", 0.4), ("merge", 0.4), ("merge", 0.5),
                                          ("d2", 0.4)])
def test_params_after_is_what_apply_stores(base, prof, method, ratio):
    plan = make_replace_plan(base, prof, method=method, ratio=ratio, rank=4)
    model = _applied(base, plan, prof)
    layers = find_moe_layers(model)
    assert plan.params_before == moetrim.routed_expert_param_count(base) == E * 3 * 64 * WIDTH * len(layers)
    assert plan.params_after == moetrim.routed_expert_param_count(model) == sum(l.routed_params() for l in layers)
    for lp, layer in zip(plan.layers, layers):
        assert _partition(lp)
        assert isinstance(layer.experts, ReplacedExperts) == bool(lp.groups)
        if lp.groups:
            assert layer.experts.spec() == {"num_experts": E, "width": WIDTH, "kept": lp.kept, "groups": lp.groups, "rank": lp.rank}
    if method == "merge":  # uniform count: floor(E (1 - ratio)) units per layer, so at least the ratio
        n = max(TOP_K, math.floor(E * (1 - ratio) + 1e-9))
        assert all(len(lp.kept) + len(lp.groups) == n for lp in plan.layers)
        assert plan.removed_fraction == pytest.approx(1 - n / E)
    else:
        assert plan.removed_fraction >= ratio
    assert plan.to_dict()["removed_fraction"] == round(plan.removed_fraction, 6)
    assert torch.isfinite(run_logits(model, IDS)).all()


def test_base_weights_of_the_plan_build_the_bases(base, prof):
    """usage weights are the routed counts, fisher the Fisher summed over the expert's dims,
    fisher_usage Fisher·count, uniform 1; the built base is the plan's weighted average of its members'
    original weights."""
    plan = make_replace_plan(base, prof, method="replace", ratio=0.4, rank=4, base_weighting="usage")
    lp = next(lp for lp in plan.layers if lp.groups)
    count = prof.get(lp.layer, "count").double()
    members = [e for g in lp.groups for e in g]
    assert lp.base_weights == {str(e): float(count[e]) for e in members}
    fisher = make_replace_plan(base, prof, method="replace", ratio=0.4, rank=4, base_weighting="fisher_usage")
    lf = next(x for x in fisher.layers if x.layer == lp.layer)
    f = prof.get(lp.layer, "fisher").double().sum(dim=1) * count
    assert lf.base_weights == {str(e): float(f[e]) for e in (e for g in lf.groups for e in g)}
    only = make_replace_plan(base, prof, method="replace", ratio=0.4, rank=4, base_weighting="fisher")
    lo = next(x for x in only.layers if x.layer == lp.layer)
    f = prof.get(lp.layer, "fisher").double().sum(dim=1)
    assert lo.base_weights == {str(e): float(f[e]) for e in (e for g in lo.groups for e in g)}
    uniform = make_replace_plan(base, prof, method="replace", ratio=0.4, rank=4, base_weighting="uniform")
    assert all(set(x.base_weights.values()) <= {1.0} for x in uniform.layers)

    original = find_moe_layers(base)[lp.layer]
    ex = find_moe_layers(_applied(base, plan, prof))[lp.layer].experts
    for g, group in enumerate(lp.groups):
        w = torch.tensor([lp.base_weights[str(e)] for e in group], dtype=torch.float64)
        w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1 / len(group))
        want = sum(wi * torch.cat([original.expert(e).gate, original.expert(e).up]).double() for wi, e in zip(w, group))
        assert torch.allclose(ex.base_gate_up[g].double(), want, atol=1e-6)


# -- plans: determinism and JSON -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["replace", "naive", "merge", "d2"])
def test_same_inputs_same_plan_bytes_and_a_reloaded_plan_applies_the_same(base, prof, method, tmp_path):
    kw = dict(method=method, ratio=0.4, rank=4, seed=3)
    plan = make_replace_plan(base, prof, **kw)
    text = plan.to_json()
    assert make_replace_plan(copy.deepcopy(base), prof, **kw).to_json() == text
    prof.save(tmp_path / "p.safetensors")
    assert make_replace_plan(base, load_profile(tmp_path / "p.safetensors"), **kw).to_json() == text
    plan.save(tmp_path / "plan.json")
    assert (tmp_path / "plan.json").read_text() == text
    loaded = ReplacePlan.from_dict(json.loads(text))
    assert loaded.to_json() == text and loaded == plan
    assert torch.equal(run_logits(_applied(base, loaded, prof), IDS), run_logits(_applied(base, plan, prof), IDS))


def test_from_dict_refuses_what_is_not_a_replace_plan(base, prof):
    d = json.loads(make_replace_plan(base, prof, ratio=0.4, rank=4).to_json())
    for bad in ({**d, "granularity": "dims"}, {**d, "layers": None}, {**d, "surprise": 1}, []):
        with pytest.raises(moetrim.UsageError) as info:
            ReplacePlan.from_dict(bad)
        assert "\n" not in str(info.value)


# -- plans: layouts ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["replace", "naive"])
def test_replace_and_naive_keep_each_layers_top_k(base, prof, method):
    plan = make_replace_plan(base, prof, method=method, ratio=0.25, rank=4, max_group=3)
    assert sum(len(g) for lp in plan.layers for g in lp.groups) > 0
    for lp, layer in zip(plan.layers, find_moe_layers(base)):
        s = criteria.score("reap", "expert", prof, layer)
        top = torch.sort(s, descending=True, stable=True).indices[:TOP_K].tolist()
        assert set(top) <= set(lp.kept) and len(lp.kept) >= lp.top_k == TOP_K
        if method == "naive":
            assert len(lp.groups) <= 1 and lp.init == "zero" and not lp.whiten
        else:
            assert all(len(g) <= 3 for g in lp.groups) and lp.init == "svd" and lp.whiten  # Grams in the profile: whitened
        assert lp.rank == (4 if lp.groups else 0)
    unwhitened = make_replace_plan(base, prof, method=method, ratio=0.25, rank=4, whiten=False)
    assert not any(lp.whiten for lp in unwhitened.layers)


def test_naive_starts_as_its_merge_whatever_the_seed(base, prof):
    """Zero-initialised corrections: the same model as the rank-0 merge of the same groups."""
    plan = make_replace_plan(base, prof, method="naive", ratio=0.4, rank=4, seed=0)
    other = ReplacePlan.from_dict({**json.loads(plan.to_json()), "seed": 5})
    a, b = _applied(base, plan, prof), _applied(base, other, prof)
    ea, eb = (find_moe_layers(m)[next(lp.layer for lp in plan.layers if lp.groups)].experts for m in (a, b))
    assert not torch.equal(ea.gate_a, eb.gate_a) and float(ea.gate_b.detach().abs().sum()) == 0
    merged = ReplacePlan.from_dict({**plan.to_dict(), "layers": [{**asdict(lp), "rank": 0} for lp in plan.layers]})
    ref = run_logits(_applied(base, merged, prof), IDS)
    assert torch.allclose(run_logits(a, IDS), ref, atol=1e-5) and torch.allclose(run_logits(b, IDS), ref, atol=1e-5)


def test_merge_has_rank_zero_and_d2_one_group_per_layer(base, prof, plain_prof):
    merge = make_replace_plan(base, prof, method="merge", ratio=0.5, rank=4)
    assert merge.rank == 0 and all(lp.rank == 0 and all(len(g) > 1 for g in lp.groups) for lp in merge.layers)
    model = _applied(base, merge, prof)
    assert all(l.experts.gate_a is None for l in find_moe_layers(model))  # no factor tensors stored
    d2 = make_replace_plan(base, prof, method="d2", ratio=0.4, rank=4)
    assert d2.rank > 0 and d2.base_weighting == "fisher"
    for lp in d2.layers:
        assert lp.kept == [] and lp.groups == [list(range(E))] and lp.rank == d2.rank and lp.whiten
    # the largest rank the budget allows: one more would not remove the ratio
    per_layer = E * 3 * 64 * WIDTH
    more = (d2.rank + 1) * 3 * (64 + WIDTH) * E + 3 * 64 * WIDTH
    assert 1 - more / per_layer < 0.4 <= d2.removed_fraction
    assert make_replace_plan(base, plain_prof, method="d2", ratio=0.4).base_weighting == "usage"
    # an explicit weighting overrides D²-MoE's own (the freedom replace.py's configuration grid gives it)
    usage = make_replace_plan(base, prof, method="d2", ratio=0.4, base_weighting="usage")
    assert usage.base_weighting == "usage" and usage.layers[0].base_weights != d2.layers[0].base_weights
    assert usage.layers[0].base_weights == make_replace_plan(base, plain_prof, method="d2", ratio=0.4).layers[0].base_weights


@pytest.mark.parametrize("which", ["fisher", "usage"])
def test_d2_base_is_the_fisher_or_usage_weighted_average_by_hand(base, prof, plain_prof, which):
    """D²-MoE's base per layer: every expert's weights averaged with weights ∝ its Fisher (summed over the
    sequences routed to it, so not multiplied by its count again), or ∝ its routed-token count when the
    profile has no Fisher."""
    profile = prof if which == "fisher" else plain_prof
    plan = make_replace_plan(base, profile, method="d2", ratio=0.4)
    model = _applied(base, plan, profile)
    for original, built in zip(find_moe_layers(base), find_moe_layers(model)):
        if which == "fisher":
            w = profile.get(original.index, "fisher").double().sum(dim=1)
        else:
            w = profile.get(original.index, "count").double()
        w = w / w.sum()
        want_gu = sum(float(w[e]) * original.experts.gate_up_proj[e].double() for e in range(E))
        want_down = sum(float(w[e]) * original.experts.down_proj[e].double() for e in range(E))
        torch.testing.assert_close(built.experts.base_gate_up[0].double(), want_gu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(built.experts.base_down[0].double(), want_down, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_d2_whitens_the_down_corrections_by_down_projs_own_inputs(base, prof):
    """SVD-LLM whitening of every matrix, down_proj included: the down correction's error on the
    intermediate activations the profile saw is the least any rank-r matrix can have (Eckart-Young on
    Δ·S, S Sᵀ the damped Gram Σ h hᵀ of down_proj's inputs)."""
    from moetrim.apply.replace import WHITEN_DAMP

    plan = make_replace_plan(base, prof, method="d2", ratio=0.4)
    model = _applied(base, plan, prof)
    r = plan.rank
    for original, built in zip(find_moe_layers(base), find_moe_layers(model)):
        ex = built.experts
        gram = prof.get(original.index, "mid_gram").double()
        for e in range(E):
            g = gram[e]
            s = torch.linalg.cholesky(g + WHITEN_DAMP * float(g.diagonal().mean()) * torch.eye(g.shape[0], dtype=g.dtype))
            delta = original.experts.down_proj[e].double() - ex.base_down[0].double()
            m = ex.member_of_expert[e]
            approx = ex.down_b[m].double() @ ex.down_a[m].double()
            best = torch.linalg.svdvals(delta @ s)[r:].square().sum().sqrt()
            assert float(((delta - approx) @ s).norm()) <= float(best) * (1 + 1e-6) + 1e-9, (original.index, e)


def test_merge_clusters_do_not_move_when_only_the_routing_moves(base, calib_ids):
    """HC-SMoE clusters every expert's output on the same tokens: another router in the last MoE layer
    (same expert weights, same inputs to that layer) routes other tokens to each expert but must give
    the same groups."""
    other = copy.deepcopy(base)
    last = find_moe_layers(other)[-1]
    with torch.no_grad():
        last.router_weight.copy_(torch.randn(last.router_weight.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    profiles = [moetrim.calibrate(m, [calib_ids], seq_len=32, fisher=False, dense_outputs=True) for m in (base, other)]
    counts = [p.get(last.index, "count") for p in profiles]
    assert not torch.equal(counts[0], counts[1])  # the routing did move
    for ratio in (0.25, 0.5):
        a, b = (make_replace_plan(m, p, method="merge", ratio=ratio) for m, p in zip((base, other), profiles))
        assert [lp.groups for lp in a.layers] == [lp.groups for lp in b.layers], ratio
    with pytest.raises(moetrim.UsageError, match="--dense-outputs"):
        make_replace_plan(base, moetrim.calibrate(base, [calib_ids], seq_len=32, fisher=False), method="merge", ratio=0.5)


@pytest.mark.parametrize("method,rank", [("replace", 4), ("replace", 32), ("naive", 20), ("merge", 4)])
def test_ratio_zero_changes_nothing(base, prof, method, rank):
    """Even at a rank whose corrections cost more than the experts they would replace."""
    plan = make_replace_plan(base, prof, method=method, ratio=0.0, rank=rank)
    assert all(lp.kept == list(range(E)) and lp.groups == [] for lp in plan.layers)
    assert plan.params_after == plan.params_before and plan.removed_fraction == 0
    model = _applied(base, plan, prof)
    assert not any(isinstance(l.experts, ReplacedExperts) for l in find_moe_layers(model))
    assert torch.equal(run_logits(model, IDS), run_logits(base, IDS))


# -- plans: refusals -----------------------------------------------------------------------------
def test_unreachable_ratio_names_the_rank(base, prof):
    with pytest.raises(moetrim.UsageError, match="--ratio 0.95 is unreachable at rank 24") as info:
        make_replace_plan(base, prof, method="replace", ratio=0.95, rank=24)
    assert "\n" not in str(info.value)
    with pytest.raises(moetrim.UsageError, match="unreachable at rank 16"):
        make_replace_plan(base, prof, method="naive", ratio=0.6, rank=16)
    # naive at rank 1: the most is every layer down to its top-k plus one base and 6 rank-1 corrections
    P, f = 3 * 64 * WIDTH, 3 * (64 + WIDTH)
    most = 1 - ((TOP_K + 1) * P + (E - TOP_K) * f) / (E * P)  # 0.5898
    with pytest.raises(moetrim.UsageError, match=f"removes at most {most:.1%}"):
        make_replace_plan(base, prof, method="naive", ratio=0.6, rank=1)
    plan = make_replace_plan(base, prof, method="naive", ratio=0.58, rank=1)
    for lp, layer in zip(plan.layers, find_moe_layers(base)):
        top = torch.sort(criteria.score("reap", "expert", prof, layer), descending=True, stable=True).indices[:TOP_K]
        assert lp.kept == sorted(top.tolist())
    with pytest.raises(moetrim.UsageError, match="unreachable with D²-MoE") as info:
        make_replace_plan(base, prof, method="d2", ratio=0.9)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kw,match", [
    (dict(rank=0), r"--rank must be between 1 and 32 \(the experts' width 32, hidden 64\), got 0"),
    (dict(rank=33), r"--rank must be between 1 and 32 \(the experts' width 32, hidden 64\), got 33"),
    (dict(method="prune"), "unknown replace method 'prune'"),
    (dict(base_weighting="bogus"), "unknown base weighting 'bogus'"),
    (dict(ratio=1.0), r"--ratio must be in \[0, 1\)"),
    (dict(ratio=-0.1), r"--ratio must be in \[0, 1\)"),
    (dict(max_group=1), "--max-group must be at least 2"),
    (dict(plain=True, base_weighting="fisher_usage"), "fisher_usage needs a profile with Fisher"),
    (dict(plain=True, whiten=True), "input Grams"),
])
def test_bad_options_are_one_line_usage_errors(base, prof, plain_prof, kw, match):
    kw = dict(kw)
    profile = plain_prof if kw.pop("plain", False) else prof
    with pytest.raises(moetrim.UsageError, match=match) as info:
        make_replace_plan(base, profile, **{"ratio": 0.4, "rank": 4, **kw})
    assert "\n" not in str(info.value)


def test_apply_refuses_another_model_a_second_apply_and_a_missing_gram(base, prof):
    plan = make_replace_plan(base, prof, method="replace", ratio=0.4, rank=4)
    other = tiny_model("qwen3_moe", seed=1)
    with pytest.raises(moetrim.UsageError, match="made for another model"):
        apply_replace_plan(other, plan, prof)
    assert not any(isinstance(l.experts, ReplacedExperts) for l in find_moe_layers(other))
    model = _applied(base, plan, prof)
    with pytest.raises(moetrim.UsageError, match="already replaced"):
        apply_replace_plan(model, plan, prof)
    with pytest.raises(moetrim.UsageError, match="input Grams"):
        apply_replace_plan(copy.deepcopy(base), plan, None)


@pytest.mark.parametrize("method", ["replace", "merge"])
def test_save_and_reload_give_identical_logits(base, prof, method, tmp_path):
    plan = make_replace_plan(base, prof, method=method, ratio=0.4, rank=4)
    model = _applied(base, plan, prof)
    out = moetrim.save(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    loaded = moetrim.load(out)
    assert moetrim.routed_expert_param_count(loaded) == plan.params_after
    assert torch.equal(run_logits(loaded, IDS), run_logits(model, IDS))


# -- recovery ------------------------------------------------------------------------------------
def _records(n=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        out.append({"prompt": f"add {a} {b} =", "response": f" {a + b}\n"})
    return out


@pytest.fixture(scope="module")
def student(base, prof):
    """A replaced model with every layer replaced (rank 4), never trained: tests copy it."""
    model = _applied(base, make_replace_plan(base, prof, method="replace", ratio=0.45, rank=4), prof)
    assert all(isinstance(l.experts, ReplacedExperts) and l.experts.replaced for l in find_moe_layers(model))
    return model


def _recover(model, **kw):
    cfg = dict(method="recover", lr=1e-2, max_steps=4, batch_size=4, seq_len=64, progress=False, logging_steps=1)
    cfg.update(kw)
    return finetune(model, tiny_tokenizer(), _records(), **cfg)


@pytest.mark.parametrize("anneal", ["blend,kd", "none"])
def test_recovery_trains_only_what_compression_created(base, student, anneal):
    model, teacher = copy.deepcopy(student), copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = _recover(model, anneal=anneal, teacher=teacher if anneal != "none" else None)
    after = result.model.state_dict()
    assert set(after) == set(before)
    created = [k for k in before if k.rsplit(".", 1)[-1] in CREATED]
    assert created and all(not torch.equal(before[k], after[k]) for k in created)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in created)  # kept experts, attention, router, embeddings
    assert any(".kept_gate_up" in k for k in before) and any("self_attn" in k for k in before)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    rec = result.report["recover"]
    assert rec["anneal"] == sorted(parse_anneal(anneal))
    assert rec["created_parameters"] == sum(before[k].numel() for k in created)
    assert rec["blend_steps"] == (2 if "blend" in anneal else 0)  # round(0.4 * 4)
    assert result.report["trainable_parameters"] == rec["created_parameters"]
    assert not any(p.requires_grad for p in result.model.parameters())


def test_hooks_are_gone_after_recovery(base, student):
    model, teacher = copy.deepcopy(student), copy.deepcopy(base)
    trained = _recover(model, anneal="blend,kd", teacher=teacher, max_steps=2, blend_fraction=1.0).model  # still blending at the end
    assert all(not l.experts._forward_hooks for l in find_moe_layers(trained))
    out = run_logits(trained, IDS)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    assert torch.equal(run_logits(trained, IDS), out)


def test_blend_and_kd_schedules(base, student):
    model, teacher = copy.deepcopy(student), copy.deepcopy(base)
    layers = find_moe_layers(model)
    rec = Recovery(model, layers, teacher, anneal={"blend", "kd"}, steps=10, blend_fraction=0.4, kd_weight=2.0, lora=False)
    assert rec.blend_steps == 4 and len(rec.handles) == len(layers)
    assert rec.lam == 0 and rec.beta == 2.0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in CREATED}
    # step 0: the replaced layers give the originals' outputs, so the model is the teacher
    assert torch.equal(run_logits(model, IDS), run_logits(teacher, IDS))
    lams, betas = [], []
    for step in range(11):
        rec.schedule(step)
        lams.append(rec.lam)
        betas.append(rec.beta)
    assert lams[0] == 0 and lams[2] == pytest.approx(0.5) and lams[4:] == [1.0] * 7
    assert all(a < b for a, b in zip(lams[:4], lams[1:5]))  # rising
    assert betas == pytest.approx([2.0 * (1 - s / 10) for s in range(11)]) and betas[-1] == 0

    # one layer: lam blends its own output with the original experts' on the same inputs
    layer, orig = layers[1], find_moe_layers(teacher)[1].experts
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 6], [3, 4]])
    w = torch.full((6, 2), 0.5)
    with torch.no_grad():
        rec.lam = 1.0
        own = layer.experts(x, idx, w)
        ref = orig(x, idx, w)
        rec.lam = 0.0
        assert torch.equal(layer.experts(x, idx, w), ref)
        rec.lam = 0.3
        assert torch.allclose(layer.experts(x, idx, w), 0.3 * own + 0.7 * ref, atol=1e-6)
        assert not torch.allclose(own, ref, atol=1e-4)

    # KD: beta · KL(teacher || student) over trained tokens; zero against the teacher itself
    labels = IDS.clone()
    labels[:, :5] = -100
    inputs = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}
    rec.lam = 1.0
    rec.schedule(5)  # beta 1.0
    t_logits = run_logits(teacher, IDS)
    assert float(rec.kd_loss(inputs, t_logits)) == pytest.approx(0.0, abs=1e-6)
    kd = float(rec.kd_loss(inputs, run_logits(model, IDS)))
    assert kd > 0
    rec.schedule(0)  # beta 2.0: twice the loss (lam back to 1: the student's own output)
    rec.lam = 1.0
    assert float(rec.kd_loss(inputs, run_logits(model, IDS))) == pytest.approx(2 * kd, rel=1e-5)
    rec.schedule(10)
    assert rec.kd_loss(inputs, t_logits) is None

    rec.remove()
    assert rec.handles == [] and rec.lam == 1.0 and rec.beta == 0.0
    with torch.no_grad():
        assert torch.equal(layer.experts(x, idx, w), own)


def test_recover_refusals(base, student):
    with pytest.raises(moetrim.UsageError, match="nothing to recover") as info:
        _recover(copy.deepcopy(base), anneal="none")
    assert "\n" not in str(info.value)
    model = copy.deepcopy(student)
    for anneal in ("blend", "kd", "blend,kd"):
        with pytest.raises(moetrim.UsageError, match="needs the uncompressed teacher") as info:
            _recover(model, anneal=anneal)
        assert "\n" not in str(info.value)
    assert all(not l.experts._forward_hooks for l in find_moe_layers(model))
    assert all(p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), student.parameters()))
    for bad in ("bogus", "", "none,kd", "blend,bogus"):
        with pytest.raises(moetrim.UsageError, match="--anneal takes") as info:
            _recover(model, anneal=bad, teacher=base)
        assert "\n" not in str(info.value)
    assert parse_anneal("none") == set() and parse_anneal(" kd , blend ") == {"blend", "kd"}


def test_router_kd_trains_only_the_routers_on_distillation_alone(base, student):
    """--router-only: after any compression (here an expert-pruned-like replaced model and a plain copy), only the
    routers move; the loss is KL(teacher || student) alone at a constant weight (zero against the teacher itself)."""
    model, teacher = copy.deepcopy(student), copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _recover(model, teacher=teacher, router_only=True)
    after = result.model.state_dict()
    router_ids = {id(p) for l in find_moe_layers(result.model) for p in l.router.parameters()}
    routers = {n for n, p in result.model.named_parameters() if id(p) in router_ids}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved == routers, (moved, routers)
    assert not any(k.rsplit(".", 1)[-1] in CREATED for k in moved)  # the replaced experts stay as built
    rec = result.report["recover"]
    assert rec["router_only"] and rec["anneal"] == ["kd"]
    assert result.report["trainable_parameters"] == sum(p.numel() for l in find_moe_layers(model) for p in l.router.parameters())
    # the loss is the distillation term alone: a student that is its teacher has nothing to learn
    # (its first step's loss; later steps differ by what AdamW makes of gradients at rounding level)
    losses = [p["loss"] for p in _recover(copy.deepcopy(base), teacher=copy.deepcopy(base), router_only=True).report["loss_curve"]]
    first = result.report["loss_curve"][0]["loss"]
    assert abs(losses[0]) < 1e-5 and 1e-3 < first < 1.0, first  # no cross-entropy term (about ln 128 here)
    layers = find_moe_layers(copy.deepcopy(student))
    rec = Recovery(copy.deepcopy(student), layers, copy.deepcopy(base), anneal={"blend"}, steps=10, blend_fraction=0.4,
                   kd_weight=2.0, lora=False, router_only=True)
    assert rec.anneal == {"kd"} and rec.handles == []
    rec.schedule(9)
    assert rec.beta == 2.0  # constant, not fading


def test_router_kd_refusals(base, student):
    for kw, match in (({"lora": 4}, "takes no --lora"), ({}, "give --teacher")):
        with pytest.raises(moetrim.UsageError, match=match) as info:
            _recover(copy.deepcopy(student), router_only=True, **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(moetrim.UsageError, match="recovery option"):
        finetune(copy.deepcopy(base), tiny_tokenizer(), _records(), method="full", router_only=True, max_steps=1, progress=False)
