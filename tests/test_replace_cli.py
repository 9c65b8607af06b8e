"""Replace, merge, D²-MoE and recover from the command line, as a user runs them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import moetrim
from moetrim.assets.tiny import save_tiny
from moetrim.cli import app


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def ws(tmp_path_factory, calib_text):
    root = tmp_path_factory.mktemp("replace-cli")
    save_tiny("qwen3_moe", root / "m")
    shutil.copy(calib_text, root / "calib.txt")
    with open(root / "train.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"count {i} ", "response": f"to {i + 1}\n"}) + "\n")
    return root


def _logits(model):
    ids = torch.arange(2, 30).reshape(2, 14)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("granularity, extra", [("replace", ["--rank", "4", "--whiten"]), ("merge", []), ("d2", []), ("naive", ["--rank", "4"])])
def test_compress_writes_a_replaced_checkpoint_with_its_plan(ws, tmp_path, granularity, extra):
    out = tmp_path / "o"
    code, stdout, err = cli("compress", ws / "m", "--data", ws / "calib.txt", "--granularity", granularity, "--ratio", "0.3",
                            "--seq-len", "32", *extra, "--out", out)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert config["model_type"] == "moetrim_replaced" and config["moetrim"]["granularity"] == granularity
    assert plan["granularity"] == granularity and plan["removed_fraction"] >= 0.3 - 1e-6
    model = moetrim.load(out)
    assert moetrim.routed_expert_param_count(model) == plan["params_after"]
    assert "removed" in stdout


def test_plan_then_apply_equals_compress(ws, tmp_path):
    assert cli("calibrate", ws / "m", "--data", ws / "calib.txt", "--seq-len", "32", "--out", tmp_path / "P.safetensors")[0] == 0
    code, _, err = cli("plan", ws / "m", "--profile", tmp_path / "P.safetensors", "--granularity", "replace", "--rank", "4",
                       "--ratio", "0.3", "--out", tmp_path / "p.json")
    assert code == 0, err
    code, _, err = cli("apply", ws / "m", "--plan", tmp_path / "p.json", "--profile", tmp_path / "P.safetensors", "--out", tmp_path / "a")
    assert code == 0, err
    code, _, err = cli("compress", ws / "m", "--data", ws / "calib.txt", "--granularity", "replace", "--rank", "4", "--ratio", "0.3",
                       "--seq-len", "32", "--out", tmp_path / "c")
    assert code == 0, err
    assert torch.equal(_logits(moetrim.load(tmp_path / "a")), _logits(moetrim.load(tmp_path / "c")))


def test_merge_from_the_stages_needs_dense_outputs_and_equals_compress(ws, tmp_path):
    """HC-SMoE clusters on every expert's outputs over the same tokens: `calibrate --dense-outputs`
    records them (compress does it by itself for merge); a profile without them is refused in one line."""
    m, calib = ws / "m", ws / "calib.txt"
    assert cli("calibrate", m, "--data", calib, "--seq-len", "32", "--no-fisher", "--out", tmp_path / "P.safetensors")[0] == 0
    code, _, err = cli("plan", m, "--profile", tmp_path / "P.safetensors", "--granularity", "merge", "--ratio", "0.3",
                       "--out", tmp_path / "x.json")
    assert code == 2 and "--dense-outputs" in err and len(err.strip().splitlines()) == 1, err
    assert cli("calibrate", m, "--data", calib, "--seq-len", "32", "--no-fisher", "--dense-outputs", "--whiten",
               "--out", tmp_path / "D.safetensors")[0] == 0
    assert cli("plan", m, "--profile", tmp_path / "D.safetensors", "--granularity", "merge", "--ratio", "0.3",
               "--out", tmp_path / "p.json")[0] == 0
    code, _, err = cli("apply", m, "--plan", tmp_path / "p.json", "--profile", tmp_path / "D.safetensors", "--out", tmp_path / "a")
    assert code == 0, err
    assert cli("compress", m, "--data", calib, "--granularity", "merge", "--ratio", "0.3", "--seq-len", "32", "--out", tmp_path / "c")[0] == 0
    assert torch.equal(_logits(moetrim.load(tmp_path / "a")), _logits(moetrim.load(tmp_path / "c")))


def test_recover_trains_and_reloads(ws, tmp_path):
    assert cli("compress", ws / "m", "--data", ws / "calib.txt", "--granularity", "replace", "--rank", "4", "--ratio", "0.3",
               "--seq-len", "32", "--out", tmp_path / "c")[0] == 0
    code, stdout, err = cli("recover", tmp_path / "c", "--data", ws / "train.jsonl", "--steps", "3", "--lr", "1e-3",
                            "--batch-size", "4", "--seq-len", "32", "--quiet", "--out", tmp_path / "r")
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "recover.json").read_text())
    assert report["recover"]["anneal"] == ["blend", "kd"] and report["steps"] == 3
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["moetrim"]["recover"]["teacher"] == str(ws / "m")
    before, after = _logits(moetrim.load(tmp_path / "c")), _logits(moetrim.load(tmp_path / "r"))
    assert not torch.equal(before, after)


def test_router_kd_from_the_cli_on_an_expert_pruned_model(ws, tmp_path):
    """`recover --router-only` works after any compression (here expert pruning, which leaves no tensor to train
    otherwise): the routers move, nothing else, and the recipe says what ran."""
    assert cli("compress", ws / "m", "--data", ws / "calib.txt", "--granularity", "experts", "--ratio", "0.25",
               "--seq-len", "32", "--out", tmp_path / "p")[0] == 0
    code, _, err = cli("recover", tmp_path / "p", "--data", ws / "train.jsonl", "--steps", "3", "--lr", "1e-2", "--router-only",
                       "--batch-size", "4", "--seq-len", "32", "--quiet", "--out", tmp_path / "r")
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "recover.json").read_text())
    assert report["recover"]["router_only"] and report["recover"]["anneal"] == ["kd"]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["moetrim"]["recover"]["router_only"] is True
    before, after = moetrim.load(tmp_path / "p").state_dict(), moetrim.load(tmp_path / "r").state_dict()
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert moved and all(k.endswith(("gate.weight", "router.weight")) and ".experts." not in k for k in moved), moved


@pytest.mark.parametrize("args, message", [
    (["compress", "{m}", "--data", "{ws}/calib.txt", "--granularity", "replace", "--rank", "0", "--out", "{ws}/x"], "--rank must be at least 1"),
    (["compress", "{m}", "--data", "{ws}/calib.txt", "--granularity", "replace", "--base-weighting", "magic", "--out", "{ws}/x"],
     "unknown base weighting"),
    (["compress", "{m}", "--data", "{ws}/calib.txt", "--granularity", "merge", "--ratio", "1.5", "--out", "{ws}/x"], "--ratio"),
    (["recover", "{m}", "--data", "{ws}/train.jsonl", "--anneal", "none", "--out", "{ws}/x"], "nothing to recover"),
    (["recover", "{m}", "--data", "{ws}/train.jsonl", "--out", "{ws}/x"], "does not record the model"),
    (["recover", "{m}", "--data", "{ws}/train.jsonl", "--anneal", "bogus", "--out", "{ws}/x"], "--anneal"),
    (["plan", "{m}", "--granularity", "merge", "--out", "{ws}/x.json"], "needs --profile"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ws, args, message):
    before = sorted(p.name for p in ws.iterdir())
    code, _, err = cli(*[a.replace("{m}", str(ws / "m")).replace("{ws}", str(ws)) for a in args])
    assert code == 2, (code, err)
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in ws.iterdir()) == before
