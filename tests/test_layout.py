"""Checkpoint folders as loaders that read folders see them: model weights only at the top, an index always."""

from __future__ import annotations

import json

import pytest
import torch

import moetrim
from moetrim.assets.tiny import tiny_model, tiny_tokenizer
from moetrim.model.routing import RoutingSpec, install_routing


def _standard(model, profile):
    plan = moetrim.make_plan(model, profile, granularity="experts", criterion="frequency", ratio=0.25, allocation="uniform")
    moetrim.apply_plan(model, plan)
    return plan


def _varwidth(model, profile):
    plan = moetrim.make_plan(model, profile, granularity="dims", criterion="activation", ratio=0.4)
    moetrim.apply_plan(model, plan)
    return plan


def _replaced(model, profile):
    from moetrim.apply.replace import apply_replace_plan
    from moetrim.plan.replace import make_replace_plan

    plan = make_replace_plan(model, profile, method="merge", ratio=0.25)
    apply_replace_plan(model, plan, profile)
    return plan


def _rerouted(model, profile):
    install_routing(model, RoutingSpec(bias=True))
    return None


@pytest.mark.parametrize("make", [_standard, _varwidth, _replaced, _rerouted])
def test_only_model_weights_are_safetensors_at_the_top(tmp_path, calib_ids, make):
    model = tiny_model("qwen3_moe")
    profile = moetrim.calibrate(model, calib_ids, batch_size=2, dense_outputs=make is _replaced)  # merge clusters on them
    plan = make(model, profile)
    out = moetrim.save(model, tmp_path / "ckpt", tokenizer=tiny_tokenizer(), plan=plan, profile=profile)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    top = sorted(p.name for p in out.glob("*.safetensors"))
    assert top == sorted(set(index["weight_map"].values())) == ["model.safetensors"]
    assert (out / "moetrim" / "profile.safetensors").is_file()
    assert moetrim.load_profile(out / "moetrim" / "profile.safetensors").digest() == profile.digest()
    with torch.no_grad():
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as sf:
            assert set(sf.keys()) == set(index["weight_map"])
            assert index["metadata"]["total_size"] == sum(sf.get_tensor(k).numel() * sf.get_tensor(k).element_size() for k in sf.keys())
    loaded = moetrim.load(out)
    assert loaded.name_or_path == str(out) and loaded.config._name_or_path == str(out)
