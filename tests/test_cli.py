"""The command line as a user meets it: stages, one-shot compress, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import moetrim
from moetrim.assets.tiny import FAMILIES
from moetrim.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output  # stdout and stderr, interleaved


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity,allocation", [("dims", "global"), ("dims", "uniform"), ("experts", "layer")])
def test_compress_every_family(family, granularity, allocation, tiny_dirs, calib_text, tmp_path):
    crit = "fisher" if granularity == "dims" else "reap"
    code, text = run("compress", tiny_dirs[family], "--data", calib_text, "--granularity", granularity,
                     "--criterion", crit, "--allocation", allocation, "--ratio", 0.5, "--seq-len", 64, "--out", tmp_path / "o")
    assert code == 0, text
    model = moetrim.load(tmp_path / "o")
    before = moetrim.load(tiny_dirs[family])
    removed = 1 - moetrim.routed_expert_param_count(model) / moetrim.routed_expert_param_count(before)
    assert abs(removed - 0.5) <= 0.02
    ids = torch.randint(0, 127, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    recipe = json.loads((tmp_path / "o" / "config.json").read_text())["moetrim"]
    assert recipe["criterion"] == crit and recipe["format"] == ("varwidth" if allocation == "global" else "standard")
    assert (tmp_path / "o" / "plan.json").is_file() and (tmp_path / "o" / "moetrim" / "profile.safetensors").is_file()
    assert (tmp_path / "o" / "tokenizer.json").is_file()


def test_stages_equal_one_shot(tiny_dirs, calib_text, tmp_path):
    d = tiny_dirs["olmoe"]
    assert run("calibrate", d, "--data", calib_text, "--seq-len", 64, "--out", tmp_path / "p.safetensors")[0] == 0
    assert run("plan", d, "--profile", tmp_path / "p.safetensors", "--ratio", 0.5, "--out", tmp_path / "plan.json")[0] == 0
    assert run("apply", d, "--plan", tmp_path / "plan.json", "--out", tmp_path / "staged")[0] == 0
    assert run("compress", d, "--data", calib_text, "--seq-len", 64, "--out", tmp_path / "oneshot")[0] == 0
    assert (tmp_path / "plan.json").read_text() == (tmp_path / "oneshot" / "plan.json").read_text()
    a, b = moetrim.load(tmp_path / "staged"), moetrim.load(tmp_path / "oneshot")
    ids = torch.randint(0, 127, (1, 12))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    # merge of two profiles adds their tokens
    assert run("calibrate", d, "--data", calib_text, "--seq-len", 64, "--no-fisher", "--out", tmp_path / "f1.safetensors")[0] == 0
    assert run("calibrate", d, "--data", calib_text, "--seq-len", 64, "--no-fisher", "--out", tmp_path / "f2.safetensors")[0] == 0
    code, text = run("merge", tmp_path / "f1.safetensors", tmp_path / "f2.safetensors", "--out", tmp_path / "m.safetensors")
    assert code == 0
    assert moetrim.load_profile(tmp_path / "m.safetensors").tokens == 2 * moetrim.load_profile(tmp_path / "f1.safetensors").tokens


def test_inspect_reports_parts(tiny_dirs, calib_text, tmp_path):
    code, text = run("inspect", tiny_dirs["qwen2_moe"], "--json")
    assert code == 0
    s = json.loads(text)
    assert s["family"] == "qwen2_moe" and [l["layer"] for l in s["moe_layers"]] == [0, 2]
    assert s["params"]["routed_experts"] == 2 * 8 * 3 * 32 * 64
    assert s["params"]["shared_experts"] > 0 and s["params"]["attention"] > 0 and s["params"]["embeddings"] > 0
    assert s["bytes"]["routed_experts"] == 4 * s["params"]["routed_experts"]
    code, text = run("inspect", tiny_dirs["mixtral"])
    assert code == 0 and "routed experts" in text and "MoE layers" in text


@pytest.fixture
def no_tokenizer(tiny_dirs, tmp_path):
    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dirs["qwen3_moe"] / f, d / f)
    return d


@pytest.mark.parametrize(
    "case,match",
    [
        ("ratio_high", "--ratio must be in [0, 1)"),
        ("ratio_negative", "--ratio must be in [0, 1)"),
        ("criterion", "unknown dim criterion 'bogus'"),
        ("other_profile", "another model"),
        ("empty_data", "calibration data is empty"),
        ("no_tokenizer", "no tokenizer files"),
        ("out_exists", "already exists"),
        ("missing_data", "data file not found"),
        ("missing_model", "model directory not found"),
    ],
)
def test_bad_inputs_fail_in_one_line(case, match, tiny_dirs, calib_text, tmp_path, no_tokenizer):
    d = tiny_dirs["qwen3_moe"]
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["compress", d, "--data", calib_text, "--seq-len", 64, "--out", out]
    args = {
        "ratio_high": base + ["--ratio", "1.0"],
        "ratio_negative": base + ["--ratio", "-0.5"],
        "criterion": base + ["--criterion", "bogus"],
        "empty_data": ["compress", d, "--data", empty, "--out", out],
        "no_tokenizer": ["compress", no_tokenizer, "--data", calib_text, "--out", out],
        "missing_data": ["compress", d, "--data", tmp_path / "nope.txt", "--out", out],
        "missing_model": ["compress", tmp_path / "nomodel", "--data", calib_text, "--out", out],
    }.get(case)
    if case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        args = base
    if case == "other_profile":
        assert run("calibrate", tiny_dirs["mixtral"], "--data", calib_text, "--seq-len", 64, "--out", tmp_path / "p.safetensors")[0] == 0
        args = ["plan", d, "--profile", tmp_path / "p.safetensors", "--out", out]
    code, text = run(*args)
    assert code == 2, text
    assert match in text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out*"))  # no temp folder left behind


def test_console_script_exit_code(tiny_dirs, calib_text, tmp_path):
    """The installed entry point, as a user runs it: usage error -> exit 2, one line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "moetrim.cli", "compress", str(tiny_dirs["mixtral"]), "--data", str(calib_text),
         "--ratio", "2", "--out", str(tmp_path / "x")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "ratio" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "moetrim.cli", "compress", "--bogus-flag"], capture_output=True, text=True)
    assert proc.returncode == 2


def test_sharded_checkpoints_load_and_save(tiny_dirs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from moetrim.checkpoint import formats as own_formats

    src = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2_moe"])
    src.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = moetrim.load(tmp_path / "sharded")
    ids = torch.randint(0, 127, (1, 10))
    with torch.no_grad():
        ref = src(ids).logits  # src is memory-mapped (maybe unaligned): equal to ~1e-7, not bitwise
        assert torch.allclose(model(ids).logits, ref, atol=1e-6, rtol=0)
    prof = moetrim.calibrate(model, [torch.randint(0, 127, (2, 16))], seq_len=16)
    moetrim.apply_plan(model, moetrim.make_plan(model, prof, ratio=0.5))
    monkeypatch.setattr(own_formats, "SHARD_BYTES", 100_000)  # where moetrim's formats shard
    out = moetrim.save(model, tmp_path / "vw")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    again = moetrim.load(out)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_eval_json_is_a_marked_report_replaced_only_with_overwrite(tiny_dirs, tmp_path):
    d, j = tiny_dirs["qwen3_moe"], tmp_path / "r.json"
    assert run("eval", d, "--tasks", "math", "--n", 1, "--json", j)[0] == 0
    assert json.loads(j.read_text())["moetrim_report"] == "eval"
    code, text = run("eval", d, "--tasks", "math", "--n", 1, "--json", j)
    assert code == 2 and "pass --overwrite" in text
    assert run("eval", d, "--tasks", "math", "--n", 1, "--json", j, "--overwrite")[0] == 0
