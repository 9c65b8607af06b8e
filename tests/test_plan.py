"""Plans: ratios honoured, constraints kept, and the same inputs give the same bytes."""

from __future__ import annotations

import json

import pytest
import torch

import moetrim
from moetrim import criteria
from moetrim.assets.tiny import tiny_model
from moetrim.calibrate import calibrate
from moetrim.plan import load_plan, make_plan


@pytest.fixture(scope="module")
def setup():
    m = tiny_model("qwen3_moe", num_hidden_layers=4)
    ids = torch.randint(0, 127, (4, 32), generator=torch.Generator().manual_seed(3))
    return m, calibrate(m, [ids], seq_len=32, batch_size=2, grad_magnitude=True)


def test_same_inputs_same_plan_bytes(setup, tmp_path):
    m, prof = setup
    for crit in ("fisher", "random"):
        a = make_plan(m, prof, criterion=crit, ratio=0.4, seed=1).to_json()
        b = make_plan(m, prof, criterion=crit, ratio=0.4, seed=1).to_json()
        assert a == b
    assert make_plan(m, prof, criterion="random", seed=1).to_json() != make_plan(m, prof, criterion="random", seed=2).to_json()
    plan = make_plan(m, prof, ratio=0.4)
    path = plan.save(tmp_path / "p.json")
    assert load_plan(path).to_json() == plan.to_json()
    d = json.loads(path.read_text())
    for key in ("schema_version", "criterion", "ratio", "allocation", "profile_digest", "layers"):
        assert key in d
    assert d["profile_digest"] == prof.digest()


@pytest.mark.parametrize("level", ["dim", "expert"])
def test_every_criterion_plans(setup, level):
    m, prof = setup
    gran = "dims" if level == "dim" else "experts"
    for name in criteria.names(level):
        plan = make_plan(m, prof, granularity=gran, criterion=name, ratio=0.5, exponents=[0, 1, 1] if name == "unified" else None)
        assert abs(plan.removed_fraction - 0.5) <= 0.02, name


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("allocation", ["global", "layer", "uniform"])
def test_ratio_is_honoured(setup, ratio, allocation):
    m, prof = setup
    plan = make_plan(m, prof, ratio=ratio, allocation=allocation)
    assert abs(plan.removed_fraction - ratio) <= 0.02
    widths = [w for l in plan.layers for w in l.widths]
    if allocation == "uniform":
        assert len(set(widths)) == 1
    if allocation == "layer":
        per_layer = [sum(l.widths) for l in plan.layers]
        assert max(per_layer) - min(per_layer) <= 2


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_layer_width_gives_one_width_per_layer_from_the_global_ranking(setup, ratio):
    m, prof = setup
    plan = make_plan(m, prof, ratio=ratio, allocation="layer_width", round_to=4)
    assert abs(plan.removed_fraction - ratio) <= plan.ratio_tolerance + 1e-9
    for l in plan.layers:
        assert len(set(l.widths)) == 1 and l.widths[0] % 4 == 0 and len(l.kept_experts) == l.experts_before
    # each layer's width follows what the global ranking keeps in that layer
    glob = make_plan(m, prof, ratio=ratio, allocation="global", min_width=plan.min_width)
    kept_global = [sum(l.widths) / l.experts_before for l in glob.layers]
    widths = [l.widths[0] for l in plan.layers]
    assert all(abs(w - k) <= 4 for w, k in zip(widths, kept_global)), (widths, kept_global)
    moetrim.apply_plan(copy_model(m), plan)


def copy_model(m):
    import copy

    return copy.deepcopy(m)


def test_layer_width_is_for_dims_only(setup):
    m, prof = setup
    with pytest.raises(moetrim.UsageError, match="applies to --granularity dims"):
        make_plan(m, prof, granularity="experts", criterion="reap", ratio=0.25, allocation="layer_width")


def test_global_allocation_moves_budget_between_layers(setup):
    m, prof = setup
    plan = make_plan(m, prof, ratio=0.5, allocation="global")
    per_layer = [sum(l.widths) for l in plan.layers]
    assert max(per_layer) - min(per_layer) > 8  # experts and layers end up with different widths


def test_min_width_round_to_and_protect(setup):
    m, prof = setup
    plan = make_plan(m, prof, ratio=0.5, min_width=8, round_to=4)
    assert all(w >= 8 and w % 4 == 0 for l in plan.layers for w in l.widths)
    assert abs(plan.removed_fraction - 0.5) <= 0.05
    plan = make_plan(m, prof, criterion="random", ratio=0.9, min_width=1, protect=3)
    for l in plan.layers:
        top = torch.sort(prof.get(l.layer, "act_abs_max").flatten(), descending=True, stable=True).indices[:3]
        kept = {(e, d) for e, dims in zip(l.kept_experts, l.kept_dims) for d in dims}
        assert all((int(t) // 32, int(t) % 32) in kept for t in top)


def test_experts_plan_keeps_top_k_and_same_count(setup):
    m, prof = setup
    plan = make_plan(m, prof, granularity="experts", criterion="man", ratio=0.9)
    assert {len(l.kept_experts) for l in plan.layers} == {1}
    assert all(l.top_k == 1 for l in plan.layers)


def test_grouped_router_loses_same_number_per_group():
    m = tiny_model("deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1)
    prof = calibrate(m, [torch.randint(0, 127, (2, 16))], seq_len=16)
    plan = make_plan(m, prof, granularity="experts", criterion="frequency", ratio=0.5)
    for l in plan.layers:
        assert sum(e < 4 for e in l.kept_experts) == sum(e >= 4 for e in l.kept_experts) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1.0}, r"\[0, 1\)"),
        ({"ratio": -0.1}, r"\[0, 1\)"),
        ({"criterion": "bogus"}, "unknown dim criterion"),
        ({"granularity": "experts", "criterion": "fisher"}, "unknown expert criterion"),
        ({"allocation": "diagonal"}, "unknown allocation"),
        ({"granularity": "heads"}, "unknown granularity"),
        ({"min_width": -1}, "min-width"),
        ({"granularity": "experts", "criterion": "unified", "exponents": [0, 3, 1]}, "0, 1 or 2"),
    ],
)
def test_bad_plan_requests(setup, kwargs, match):
    m, prof = setup
    with pytest.raises(moetrim.UsageError, match=match):
        make_plan(m, prof, **kwargs)


def test_profile_from_other_model_or_without_gradients(setup):
    m, prof = setup
    with pytest.raises(moetrim.UsageError, match="another model"):
        make_plan(tiny_model("qwen3_moe", num_hidden_layers=4, seed=3), prof)
    fwd = calibrate(m, [torch.randint(0, 127, (1, 16))], seq_len=16, fisher=False)
    with pytest.raises(moetrim.UsageError, match="no-fisher"):
        make_plan(m, fwd, criterion="fisher")
    assert make_plan(m, fwd, criterion="activation", ratio=0.5).removed_fraction > 0.48
