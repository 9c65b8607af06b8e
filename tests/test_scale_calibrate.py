"""Calibration at scale: a model spread over devices (accelerate offload), gradient checkpointing,
data-parallel processes (gloo), and running out of memory. Every variant must give the profile one
process on one device gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from moetrim.assets.tiny import save_tiny
from moetrim.calibrate import calibrate, load_profile
from moetrim.calibrate.instrument import ProfilingExperts
from moetrim.checkpoint import load_model
from moetrim.cli import app

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# Half the decoder layers offloaded to disk (weights on meta until accelerate's hook loads them), the rest on CPU.
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    save_tiny("qwen3_moe", root / "m")
    (root / "split.json").write_text(json.dumps(SPLIT))
    return root


@pytest.fixture(scope="module")
def ids():
    return [torch.randint(0, 127, (24,), generator=torch.Generator().manual_seed(i)) for i in range(6)]


def same(a, b, rtol=1e-6, atol=1e-9):
    assert set(a.stats) == set(b.stats)
    for k in a.stats:
        torch.testing.assert_close(a.stats[k], b.stats[k], rtol=rtol, atol=atol, msg=k)
    assert {k: v for k, v in a.meta.items() if k != "processes"} == {k: v for k, v in b.meta.items() if k != "processes"}


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("fisher", [False, True], ids=["forward", "fisher"])
def test_offloaded_layers_give_the_one_device_profile(tiny, ids, tmp_path, fisher):
    ref = calibrate(load_model(tiny / "m"), ids, fisher=fisher, grad_magnitude=fisher, batch_size=4)
    model = load_model(tiny / "m", device_map=SPLIT, offload_folder=tmp_path / "off")
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.device.type == "meta" and hasattr(experts, "_hf_hook")  # really offloaded
    got = calibrate(model, ids, fisher=fisher, grad_magnitude=fisher, batch_size=4)
    same(got, ref)
    assert got.meta["processes"] == "1"
    # the placed model is left as it was: experts module back, weights offloaded again, no gradients kept
    assert model.model.layers[1].mlp.experts is experts and experts.gate_up_proj.device.type == "meta"
    assert all(p.grad is None for p in model.parameters())


def test_grad_checkpoint_recomputes_and_gives_the_same_profile(tiny, ids, tmp_path, monkeypatch):
    calls = []
    inner = ProfilingExperts._forward

    def counting(self, *a):
        calls.append(self.rec.layer.index)
        return inner(self, *a)

    monkeypatch.setattr(ProfilingExperts, "_forward", counting)
    model = load_model(tiny / "m")
    plain = calibrate(model, ids, grad_magnitude=True, batch_size=4)
    n_plain = len(calls)
    model.train()  # the caller's mode comes back, and checkpointing stays off
    ckpt = calibrate(model, ids, grad_magnitude=True, batch_size=4, grad_checkpoint=True)
    assert len(calls) - n_plain == 2 * n_plain  # every MoE layer ran again in backward
    same(ckpt, plain)
    assert model.training and all(l.training for l in model.model.layers) and not model.is_activation_checkpointing
    assert not hasattr(model, "_require_grads_hook")
    placed = load_model(tiny / "m", device_map=SPLIT, offload_folder=tmp_path / "off")
    same(calibrate(placed, ids, grad_magnitude=True, batch_size=4, grad_checkpoint=True), plain)


def test_cli_device_map_file_and_auto_equal_plain(tiny, tmp_path):
    common = ["calibrate", tiny / "m", "--data", tiny / "calib.txt", "--seq-len", 16, "--max-tokens", 200]
    (tiny / "calib.txt").write_text(" ".join(f"w{i % 97}" for i in range(600)))
    assert cli(*common, "--out", tmp_path / "one.safetensors")[0] == 0
    code, _, err = cli(*common, "--device-map", tiny / "split.json", "--offload-folder", tmp_path / "off", "--grad-checkpoint",
                       "--out", tmp_path / "split.safetensors")
    assert code == 0, err
    code, _, err = cli(*common, "--device-map", "auto", "--max-memory", "cpu=300KB", "--offload-folder", tmp_path / "off2",
                       "--no-fisher", "--out", tmp_path / "auto.safetensors")
    assert code == 0, err
    one = load_profile(tmp_path / "one.safetensors")
    same(load_profile(tmp_path / "split.safetensors"), one)
    fwd = load_profile(tmp_path / "auto.safetensors")
    for k in fwd.stats:
        torch.testing.assert_close(fwd.stats[k], one.stats[k], rtol=1e-6, atol=1e-9, msg=k)


def test_two_gloo_processes_equal_one(tiny, tmp_path):
    (tiny / "calib2.txt").write_text(" ".join(f"w{(i * 7) % 101}" for i in range(900)))
    common = ["calibrate", tiny / "m", "--data", tiny / "calib2.txt", "--seq-len", 16, "--max-tokens", 300, "--grad-magnitude"]
    assert cli(*common, "--out", tmp_path / "one.safetensors")[0] == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                          "-m", "moetrim.cli", *map(str, common), "--out", str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("from 2 processes") == 1  # rank 0 alone reports and writes
    one, both = load_profile(tmp_path / "one.safetensors"), load_profile(tmp_path / "two.safetensors")
    assert both.processes == 2 and one.processes == 1
    same(both, one, rtol=1e-5, atol=1e-7)  # float32 sums in another thread count and float64 in another order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]
    assert one.merge(both).processes == 3


def test_out_of_memory_is_one_line_and_writes_nothing(tiny, tmp_path, monkeypatch):
    def oom(self, *a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ProfilingExperts, "_forward", oom)
    (tiny / "calib3.txt").write_text(" ".join(f"w{i % 50}" for i in range(100)))
    code, out, err = cli("calibrate", tiny / "m", "--data", tiny / "calib3.txt", "--seq-len", 16, "--out", tmp_path / "p.safetensors")
    lines = [l for l in err.splitlines() if l.strip() and "calibrating" not in l]
    assert code == 1 and len(lines) == 1 and "out of device memory" in lines[0] and "--device-map" in lines[0], err
    assert "Traceback" not in err + out and not list(tmp_path.iterdir())


def test_bad_placement_values_are_one_line(tiny):
    from moetrim.checkpoint.placement import parse_device_map, parse_max_memory
    from moetrim.errors import UsageError

    assert parse_max_memory("cpu=60GiB,disk=500GB") == {"cpu": "60GiB", "disk": "500GB"}
    assert parse_device_map("balanced") == "balanced" and parse_device_map(str(tiny / "split.json")) == SPLIT
    for bad in ("cpu", "cpu=", "=5GB", "cpu=lots", "tpu=5GB"):
        with pytest.raises(UsageError):
            parse_max_memory(bad)


def test_compress_offloading_a_tied_model_to_disk_gives_the_one_device_plan(calib_text, tmp_path):
    """The reference model ties its output head to the embedding; offloading them to disk unties the
    two, which calibration's bookkeeping did not expect (KeyError 'lm_head.weight', issue 26). The
    offloaded weights go to a hidden folder inside --offload-folder that goes with the command."""
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "keep.txt").write_text("mine")
    common = ["compress", "reference", "--data", calib_text, "--seq-len", 32, "--max-tokens", 64]
    assert cli(*common, "--out", tmp_path / "one")[0] == 0
    code, _, stderr = cli(*common, "--device-map", "auto", "--max-memory", "cpu=1MB", "--offload-folder", tmp_path / "off",
                          "--out", tmp_path / "spread")
    assert code == 0, stderr
    one, spread = (json.loads((tmp_path / d / "plan.json").read_text()) for d in ("one", "spread"))
    assert spread["layers"] == one["layers"]
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["keep.txt"]
