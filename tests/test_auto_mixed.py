"""`--method auto` with every candidate: per layer, dims or experts sliced, or experts turned into novices,
merged or replaced, in one plan, one model and one checkpoint."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from helpers import mixed_auto_plan
from typer.testing import CliRunner

import moetrim
from moetrim.apply import apply_plan
from moetrim.assets.tiny import save_tiny, tiny_model
from moetrim.calibrate import calibrate
from moetrim.checkpoint import load_model
from moetrim.cli import app
from moetrim.errors import UsageError
from moetrim.evaluate.summary import summarize
from moetrim.plan import load_plan
from moetrim.plan.auto import layer_options, make_auto_plan


@pytest.fixture(scope="module")
def qwen3():
    m = tiny_model("qwen3_moe", num_hidden_layers=2, seed=4)
    ids = torch.randint(0, 127, (4, 32), generator=torch.Generator().manual_seed(5))
    return m, calibrate(m, [ids], seq_len=32, batch_size=2, dense_outputs=True)


def _batches():
    return [torch.randint(0, 127, (2, 32), generator=torch.Generator().manual_seed(s)) for s in (11, 12)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_a_mixed_plan_builds_each_layer_by_its_own_method_and_round_trips(qwen3, tmp_path):
    model, prof = qwen3
    mixed, dims, novices = mixed_auto_plan(model, prof)
    m = copy.deepcopy(model)
    assert apply_plan(m, mixed, prof).format == "varwidth"
    # the reference: layer 0 from the dims plan applied alone, layer 1 from the novice plan applied alone
    a, b, ref = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(a, dims)
    apply_plan(b, novices, prof)
    ref.model.layers[0].mlp, ref.model.layers[1].mlp = a.model.layers[0].mlp, b.model.layers[1].mlp
    ids = torch.randint(0, 127, (2, 12), generator=torch.Generator().manual_seed(8))
    assert torch.equal(_logits(m, ids), _logits(ref, ids))
    assert sum(p.numel() for p in m.model.layers[1].mlp.experts.parameters()) < sum(
        p.numel() for p in model.model.layers[1].mlp.experts.parameters())
    moetrim.save(m, tmp_path / "mx", plan=mixed, profile=prof)
    config = json.loads((tmp_path / "mx" / "config.json").read_text())
    assert list(config["moetrim_varwidth"]["layers"]) == ["0"] and list(config["moetrim_replaced"]["layers"]) == ["1"]
    back = load_model(tmp_path / "mx")
    assert torch.equal(_logits(back, ids), _logits(m, ids))
    assert summarize(back)["format"] == "varwidth + replaced"  # what `moetrim inspect` prints
    mixed.save(tmp_path / "p.json")
    back = load_plan(tmp_path / "p.json")
    assert back.to_json() == mixed.to_json() and back.replaced_layers[0].novices == novices.layers[1].novices
    with pytest.raises(UsageError, match="--profile"):
        apply_plan(copy.deepcopy(model), back)  # novices' vectors come from the profile


def test_auto_measures_novices_and_merging_and_merge_needs_dense_outputs(qwen3):
    model, prof = qwen3
    grid = (0.25, 0.5)
    methods = {o.method for opts in layer_options(model, prof, _batches(), grid=grid).values() for o in opts}
    assert {"novice:mone", "merge:output_similarity", "dims:fisher", "dims:camera", "experts:reap"} <= methods
    plain = calibrate(model, [torch.randint(0, 127, (4, 32), generator=torch.Generator().manual_seed(5))], seq_len=32, batch_size=2)
    methods = {o.method for opts in layer_options(model, plain, _batches(), grid=grid).values() for o in opts}
    assert "novice:mone" in methods and not any(m.startswith("merge") for m in methods)


def test_auto_of_novices_alone_writes_a_replaced_model_whose_guard_kl_holds(qwen3, tmp_path):
    """With novices the only candidate, every layer the allocation touches is a replaced layer and none is
    sliced: the model is in the replaced format, and its KL is the guard's."""
    model, prof = qwen3
    batches = _batches()
    plan = make_auto_plan(model, prof, batches, ratio=0.5, candidates=(("novice", "mone"),), grid=(0.25, 0.5, 0.75))
    guard = next(n for n in plan.notes if n.startswith("auto:"))
    kls = {name: float(v) for name, v in re.findall(r"(auto \(per-layer allocation\)|[a-z]+:[a-z]+ alone) ([0-9.e+-]+)", guard)}
    assert set(kls) == {"auto (per-layer allocation)", "novice:mone alone"}
    m = copy.deepcopy(model)
    fmt = apply_plan(m, plan, prof).format
    if plan.granularity == "auto":
        assert plan.replaced_layers and fmt == "replaced"
    with torch.no_grad():
        p = torch.cat([torch.log_softmax(model(input_ids=b).logits.double(), -1).flatten(0, 1) for b in batches])
        q = torch.cat([torch.log_softmax(m(input_ids=b).logits.double(), -1).flatten(0, 1) for b in batches])
    assert float((p.exp() * (p - q)).sum(-1).mean()) == pytest.approx(min(kls.values()), rel=2e-3)
    moetrim.save(m, tmp_path / "nov", plan=plan, profile=prof)
    ids = batches[0]
    back = load_model(tmp_path / "nov")
    assert torch.equal(_logits(back, ids), _logits(m, ids))
    if plan.granularity == "auto":
        assert summarize(back)["format"] == "replaced"


def test_compress_method_auto_from_the_cli_saves_what_it_chose(tmp_path, calib_text):
    save_tiny("qwen3_moe", tmp_path / "m")
    r = CliRunner().invoke(app, ["compress", str(tmp_path / "m"), "--data", str(calib_text), "--seq-len", "32", "--method", "auto",
                                 "--ratio", "0.5", "--out", str(tmp_path / "o")], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert "auto: final-logit KL" in r.stdout
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["removed_fraction"] >= 0.5 - 1e-9
    model = load_model(tmp_path / "o")
    ids = torch.randint(0, 127, (1, 8), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(_logits(model, ids)).all()
