"""Working from the checkpoint on disk: layer-by-layer loading, sequential calibration, planning
without weights and streaming apply each equal the whole-model path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from moetrim.assets import resolve_model_path
from moetrim.assets.tiny import FAMILIES
from moetrim.apply.slicing import apply_plan
from moetrim.apply.streaming import apply_streaming
from moetrim.calibrate import calibrate
from moetrim.calibrate.sequential import calibrate_sequential
from moetrim.checkpoint import load_model, load_tokenizer, make_recipe, save_checkpoint
from moetrim.checkpoint.disk import DiskModel
from moetrim.checkpoint.shards import ModuleLoader, named_decoder_layers, outside_layers
from moetrim.cli import app
from moetrim.errors import MoetrimError
from moetrim.model.view import find_moe_layers
from moetrim.plan import make_plan

runner = CliRunner()
TEXTS = ["the quick brown fox jumps over the lazy dog and the cat sat on a mat " * 10] * 5
REF = str(resolve_model_path("reference"))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name in sorted(set(index.values())):
        with safe_open(str(folder / name), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_module_loader_equals_from_pretrained(tiny_dirs, family):
    """Every tensor, filled one decoder layer at a time from the files, equals transformers' own load."""
    path = tiny_dirs[family]
    full = load_model(path)
    meta = load_model(path, meta=True)
    loader = ModuleLoader(meta, path, torch.float32)
    name, layers = named_decoder_layers(meta)
    for i in range(len(layers)):
        loader.load(f"{name}.{i}")
    for piece in outside_layers(meta, name):
        loader.load(piece)
    got, ref = meta.state_dict(), full.state_dict()
    assert set(got) == set(ref)
    bad = [k for k in ref if got[k].is_meta or not torch.equal(got[k], ref[k])]
    assert not bad
    loader.release(f"{name}.0")
    assert all(p.is_meta for p in layers[0].parameters())


def test_module_loader_keeps_expert_order_past_ten():
    """The reference model has 16 experts: files list expert 10 before expert 2; the fused tensor may not."""
    full = load_model(REF)
    meta = load_model(REF, meta=True)
    loader = ModuleLoader(meta, REF, torch.float32)
    loader.load("model.layers.1")
    key = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(meta.state_dict()[key], full.state_dict()[key])


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_sequential_equals_whole_model(tiny_dirs, family):
    path = tiny_dirs[family]
    tok = load_tokenizer(path)
    whole = calibrate(load_model(path), TEXTS, tokenizer=tok, fisher=False, seq_len=48, batch_size=2)
    seq = calibrate_sequential(path, TEXTS, tokenizer=tok, seq_len=48, batch_size=2)
    assert set(seq.stats) == set(whole.stats)
    for k in whole.stats:
        torch.testing.assert_close(seq.stats[k], whole.stats[k], rtol=1e-6, atol=1e-6, msg=k)
    for k in ("model_fingerprint", "tokens", "sequences", "data_digest", "fisher"):
        assert seq.meta[k] == whole.meta[k]
    assert seq.meta["sequential"] == "true"


def test_sequential_reference_and_refuses_compressed(tmp_path):
    tok = load_tokenizer(REF)
    whole = calibrate(load_model(REF), TEXTS, tokenizer=tok, fisher=False, seq_len=64, batch_size=2)
    seq = calibrate_sequential(REF, TEXTS, tokenizer=tok, seq_len=64, batch_size=2)
    for k in whole.stats:
        torch.testing.assert_close(seq.stats[k], whole.stats[k], rtol=1e-6, atol=1e-6, msg=k)
    model = load_model(REF)
    plan = make_plan(model, seq, criterion="activation", ratio=0.5)
    apply_plan(model, plan)
    save_checkpoint(model, tmp_path / "small", tokenizer=tok, plan=plan)
    with pytest.raises(Exception, match="calibrate the original model"):
        calibrate_sequential(tmp_path / "small", TEXTS, tokenizer=tok, seq_len=64)


@pytest.mark.parametrize("kw", [dict(criterion="fisher"), dict(criterion="magnitude", allocation="layer"),
                                dict(granularity="experts", criterion="reap")])
def test_plan_from_disk_equals_plan_from_loaded_model(kw):
    model = load_model(REF)
    profile = calibrate(model, TEXTS, tokenizer=load_tokenizer(REF), seq_len=64, batch_size=2)
    disk = DiskModel(REF)
    a = make_plan(model, profile, ratio=0.5, **kw)
    b = make_plan(disk.model, profile, ratio=0.5, layer_weights=disk.layer_weights, **kw)
    assert a.to_dict() == b.to_dict()
    experts = [p for layer in find_moe_layers(disk.model) for p in layer.experts.parameters()]
    assert experts and all(p.is_meta for p in experts)  # weights were read one layer at a time and let go


@pytest.mark.parametrize("family,kw", [("qwen3_moe", dict(criterion="magnitude", ratio=0.5)),
                                       ("mixtral", dict(criterion="magnitude", ratio=0.5, allocation="uniform")),
                                       ("deepseek_v3", dict(criterion="magnitude", ratio=0.5, allocation="uniform")),
                                       ("olmoe", dict(granularity="experts", criterion="random", ratio=0.25))])
def test_streaming_apply_writes_the_in_memory_tensors(tiny_dirs, tmp_path, family, kw):
    path = tiny_dirs[family]
    model = load_model(path)
    plan = make_plan(model, None, **kw)
    result = apply_plan(model, plan)
    save_checkpoint(model, tmp_path / "mem", plan=plan, recipe=make_recipe(plan, None, str(path), result.format))
    streamed = apply_streaming(DiskModel(path), plan, tmp_path / "disk", source=str(path), shard_bytes=30_000)
    assert streamed.format == result.format
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "disk")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "mem" / "config.json").read_text()) == json.loads((tmp_path / "disk" / "config.json").read_text())
    assert len(list((tmp_path / "disk").glob("model-*-of-*.safetensors"))) > 1  # small shards: several files
    again = load_model(tmp_path / "disk")
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_cli_streaming_apply_is_byte_identical(tmp_path, calib_text):
    prof, plan = tmp_path / "p.safetensors", tmp_path / "plan.json"
    assert runner.invoke(app, ["calibrate", REF, "--data", str(calib_text), "--out", str(prof), "--max-tokens", "600"]).exit_code == 0
    assert runner.invoke(app, ["plan", REF, "--profile", str(prof), "--out", str(plan)]).exit_code == 0
    for out, extra in (("mem", []), ("disk", ["--streaming"])):
        r = runner.invoke(app, ["apply", REF, "--plan", str(plan), "--profile", str(prof), "--out", str(tmp_path / out), *extra])
        assert r.exit_code == 0, r.output
    for f in ("model.safetensors", "config.json", "model.safetensors.index.json", "plan.json", "moetrim/profile.safetensors"):
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "disk" / f).read_bytes(), f


def _sharded_copy(src: str, dst: Path) -> Path:
    model = load_model(src)
    model.save_pretrained(dst, max_shard_size="40KB")
    load_tokenizer(src, required=False) and load_tokenizer(src).save_pretrained(dst)
    return dst


def test_missing_shard_one_line_and_nothing_written(tiny_dirs, tmp_path):
    ckpt = _sharded_copy(tiny_dirs["qwen3_moe"], tmp_path / "ckpt")
    shards = sorted(ckpt.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(MoetrimError, match="is missing"):
        DiskModel(ckpt)
    plan_path = tmp_path / "plan.json"
    model = load_model(tiny_dirs["qwen3_moe"])
    make_plan(model, None, criterion="magnitude", ratio=0.5).save(plan_path)
    r = runner.invoke(app, ["apply", str(ckpt), "--plan", str(plan_path), "--out", str(tmp_path / "out"), "--streaming"])
    assert r.exit_code == 1
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "missing" in lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_streaming_apply_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    path = tiny_dirs["mixtral"]
    model = load_model(path)
    plan = make_plan(model, None, criterion="magnitude", ratio=0.5)
    disk = DiskModel(path)
    calls = {"n": 0}
    real = disk.loader.release

    def release_then_interrupt(prefix):
        real(prefix)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(disk.loader, "release", release_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        apply_streaming(disk, plan, tmp_path / "out", shard_bytes=30_000)
    assert list(tmp_path.iterdir()) == []
