"""Applying a plan gives real smaller tensors that compute exactly what masking would."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moetrim
from moetrim.assets.tiny import FAMILIES, tiny_model
from moetrim.calibrate import calibrate
from moetrim.model.view import find_moe_layers
from moetrim.plan import make_plan

from helpers import auto_equals_moetrim_load, masked_model_logits, plain_transformers_error, run_logits

ATOL = 1e-5


@pytest.fixture(scope="module")
def profiled():
    """family -> (model, profile) calibrated once per family."""
    ids = torch.randint(0, 127, (4, 32), generator=torch.Generator().manual_seed(3))
    out = {}
    for fam in FAMILIES:
        m = tiny_model(fam)
        out[fam] = (m, calibrate(m, [ids], seq_len=32, batch_size=2, grad_magnitude=True))
    return out


@pytest.fixture(scope="module")
def eval_ids():
    return torch.randint(0, 127, (2, 24), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["dims", "experts"])
def test_ratio_zero_is_identical(family, granularity, profiled, eval_ids):
    base, prof = profiled[family]
    m = copy.deepcopy(base)
    crit = "fisher" if granularity == "dims" else "reap"
    plan = make_plan(m, prof, granularity=granularity, criterion=crit, ratio=0.0)
    res = moetrim.apply_plan(m, plan)
    assert res.format == "standard"
    assert plan.removed_fraction == 0.0
    assert torch.equal(run_logits(m, eval_ids), run_logits(base, eval_ids))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "granularity,allocation,criterion,min_width",
    [
        ("dims", "global", "fisher", None),
        ("dims", "layer", "activation", None),
        ("dims", "uniform", "taylor", None),
        ("dims", "global", "grad_magnitude", 0),  # experts may reach zero width and be removed
        ("experts", "layer", "reap", None),
        ("experts", "global", "frequency", None),
    ],
)
def test_apply_equals_masking(family, granularity, allocation, criterion, min_width, profiled, eval_ids):
    base, prof = profiled[family]
    if allocation == "global" and granularity == "experts" and any(l.num_groups > 1 for l in find_moe_layers(base)):
        with pytest.raises(moetrim.UsageError, match="grouped router"):
            make_plan(base, prof, granularity=granularity, criterion=criterion, ratio=0.5, allocation=allocation)
        return
    m = copy.deepcopy(base)
    plan = make_plan(m, prof, granularity=granularity, criterion=criterion, ratio=0.5, allocation=allocation, min_width=min_width)
    assert abs(plan.removed_fraction - 0.5) <= 0.02
    expected = masked_model_logits(base, plan, eval_ids)
    moetrim.apply_plan(m, plan)
    got = run_logits(m, eval_ids)
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), float((got - expected).abs().max())
    # and the weights really shrank
    assert moetrim.routed_expert_param_count(m) == plan.params_after
    assert plan.params_after < 0.52 * plan.params_before


def test_zero_width_experts_are_removed_with_router_rows(profiled, eval_ids):
    base, prof = profiled["qwen3_moe"]
    plan = make_plan(base, prof, granularity="dims", criterion="fisher", ratio=0.7, min_width=0)
    removed = [l for l in plan.layers if len(l.kept_experts) < l.experts_before]
    assert removed, "at 70% with min-width 0 some expert should go entirely"
    m = copy.deepcopy(base)
    moetrim.apply_plan(m, plan)
    for layer, lp in zip(find_moe_layers(m), plan.layers):
        assert layer.router_weight.shape[0] == len(lp.kept_experts) == layer.num_experts
        assert layer.top_k <= layer.num_experts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity,allocation", [("dims", "global"), ("dims", "uniform"), ("experts", "layer")])
def test_save_load_roundtrip(family, granularity, allocation, profiled, eval_ids, tmp_path):
    base, prof = profiled[family]
    m = copy.deepcopy(base)
    plan = make_plan(m, prof, granularity=granularity, criterion="fisher" if granularity == "dims" else "man", ratio=0.5, allocation=allocation)
    res = moetrim.apply_plan(m, plan)
    out = moetrim.save(m, tmp_path / "out", plan=plan, profile=prof)
    before = run_logits(m, eval_ids)
    loaded = moetrim.load(out)
    assert torch.equal(run_logits(loaded, eval_ids), before)
    assert json.loads((out / "plan.json").read_text())["criterion"] == plan.criterion
    assert moetrim.load_profile(out / "moetrim" / "profile.safetensors").digest() == prof.digest()
    if allocation == "global":
        assert res.format == "varwidth"
        # plain transformers must refuse, not silently re-initialise experts; after `import moetrim` it loads
        if family == "qwen3_moe":  # a fresh interpreter per check: once is enough
            assert "moetrim_varwidth" in plain_transformers_error(out)
        assert auto_equals_moetrim_load(out, eval_ids)
    else:
        assert res.format == "standard"
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert torch.allclose(run_logits(plain.eval(), eval_ids), before, atol=1e-6, rtol=0)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["moetrim"]["criterion"] == plan.criterion  # the record of how it was made


def test_deepseek_shared_expert_unchanged_by_uniform_width(profiled):
    base, prof = profiled["deepseek_v2"]
    m = copy.deepcopy(base)
    shared_before = {n: p.clone() for n, p in m.named_parameters() if "shared_experts" in n}
    plan = make_plan(m, prof, granularity="dims", criterion="fisher", ratio=0.5, allocation="uniform")
    assert moetrim.apply_plan(m, plan).format == "standard"
    shared_after = {n: p for n, p in m.named_parameters() if "shared_experts" in n}
    assert shared_before.keys() == shared_after.keys()
    assert all(torch.equal(shared_before[n], shared_after[n]) for n in shared_before)
    assert m.config.moe_intermediate_size == 16 and m.config.n_shared_experts == 4


def test_deepseek_untieable_width_falls_back_to_varwidth(profiled):
    base, prof = profiled["deepseek_v3"]  # shared width 32 is not a multiple of 12
    m = copy.deepcopy(base)
    plan = make_plan(m, prof, granularity="dims", criterion="fisher", ratio=0.625, allocation="uniform", round_to=1)
    assert plan.layers[0].widths[0] == 12
    res = moetrim.apply_plan(m, plan)
    assert res.format == "varwidth" and "shared expert" in res.note


def test_apply_rejects_plan_of_other_model(profiled):
    base, prof = profiled["mixtral"]
    plan = make_plan(base, prof, granularity="dims", criterion="fisher", ratio=0.5)
    other = tiny_model("mixtral", seed=5)
    with pytest.raises(moetrim.UsageError, match="another model"):
        moetrim.apply_plan(other, plan)


def test_bfloat16_model_compresses(eval_ids, tmp_path):
    m = tiny_model("qwen2_moe", dtype=torch.bfloat16)
    ids = torch.randint(0, 127, (2, 32), generator=torch.Generator().manual_seed(1))
    prof = calibrate(m, [ids], seq_len=32)
    assert prof.get(0, "fisher").dtype == torch.float64 and prof.get(0, "act_abs_max").dtype == torch.float32
    assert torch.isfinite(prof.get(0, "fisher")).all() and prof.get(0, "fisher").sum() > 0
    plan = make_plan(m, prof, ratio=0.5)
    moetrim.apply_plan(m, plan)
    moetrim.save(m, tmp_path / "bf")
    loaded = moetrim.load(tmp_path / "bf")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(run_logits(loaded, eval_ids).float()).all()


def test_varwidth_checkpoint_in_expert_order_still_loads(profiled, eval_ids, tmp_path):
    """Checkpoints written before blocks were sorted by width (record version 1, no layout) hold each
    layer's experts in expert order; they load as such and compute what they computed."""
    from safetensors.torch import load_file, save_file

    base, prof = profiled["qwen3_moe"]
    m = copy.deepcopy(base)
    moetrim.apply_plan(m, make_plan(m, prof, criterion="fisher", ratio=0.5, allocation="global"))
    out = moetrim.save(m, tmp_path / "out")
    before = run_logits(m, eval_ids)
    state = load_file(out / "model.safetensors")
    for name, mod in m.named_modules():
        if getattr(mod, "is_moetrim_varwidth", False):
            assert mod.layout == "by_width" and mod.expert_of_block != list(range(mod.num_experts))
            experts = [mod.expert_weights(e) for e in range(mod.num_experts)]
            state[f"{name}.gate_up"] = torch.cat([torch.cat([w.gate, w.up]) for w in experts]).contiguous()
            state[f"{name}.down_blocks"] = torch.cat([w.down.reshape(-1) for w in experts]).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["moetrim_varwidth"] = {"version": 1, "layers": cfg["moetrim_varwidth"]["layers"]}
    (out / "config.json").write_text(json.dumps(cfg))
    old = moetrim.load(out)
    assert all(l.experts.layout == "by_expert" for l in find_moe_layers(old))
    assert torch.equal(run_logits(old, eval_ids), before)
