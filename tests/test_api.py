"""The Python API: one verb per command (compress, recover, evaluate, routing_health, make_plan and
apply_plan for every granularity), each giving what its command gives."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import moetrim
from moetrim.cli import app
from moetrim.model.view import find_moe_layers

MAX_TOKENS = 256


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return r


def _loaded(path):
    return moetrim.load(path, dtype="float32"), moetrim.load_tokenizer(path)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _runs(model):
    ids = torch.arange(2, 30).reshape(2, 14)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def test_every_verb_is_exported():
    for name in ("compress", "recover", "evaluate", "routing_health", "make_plan", "apply_plan", "calibrate", "load", "save",
                 "finetune", "reference_model", "CompressResult"):
        assert name in moetrim.__all__ and getattr(moetrim, name).__doc__


def test_compress_experts_removes_experts_and_the_model_runs(tiny_dirs, calib_text):
    model, tok = _loaded(tiny_dirs["qwen3_moe"])
    before = [l.num_experts for l in find_moe_layers(model)]
    result = moetrim.compress(model, str(calib_text), method="experts", ratio=0.5, tokenizer=tok, max_tokens=MAX_TOKENS)
    assert isinstance(result, moetrim.CompressResult) and result.model is model
    after = [l.num_experts for l in find_moe_layers(model)]
    assert all(a < b for a, b in zip(after, before))
    assert result.plan.removed_fraction >= 0.5 - result.plan.ratio_tolerance
    assert result.report["format"] == "standard" and result.report["params_after"] < result.report["params_before"]
    _runs(model)


@pytest.mark.parametrize("method, extra", [("dims", []), ("merge", [])])
def test_compress_gives_what_the_command_saves(tiny_dirs, calib_text, tmp_path, method, extra):
    src = tiny_dirs["qwen3_moe"]
    cli("compress", src, "--data", calib_text, "--out", tmp_path / "cli", "--granularity", method, "--ratio", 0.25,
        "--max-tokens", MAX_TOKENS, "--dtype", "float32", *extra)
    model, tok = _loaded(src)
    result = moetrim.compress(model, str(calib_text), method=method, ratio=0.25, tokenizer=tok, max_tokens=MAX_TOKENS)
    saved = json.loads((tmp_path / "cli" / "plan.json").read_text())
    assert result.plan.to_dict() == saved
    _same_weights(result.model, moetrim.load(tmp_path / "cli", dtype="float32"))


def test_make_plan_and_apply_plan_serve_a_replace_granularity(tiny_dirs, calib_text, tmp_path):
    src = tiny_dirs["qwen3_moe"]
    cli("compress", src, "--data", calib_text, "--out", tmp_path / "cli", "--granularity", "replace", "--ratio", 0.25, "--rank", 4,
        "--max-tokens", MAX_TOKENS, "--dtype", "float32")
    model, tok = _loaded(src)
    profile = moetrim.calibrate(model, str(calib_text), tokenizer=tok, max_tokens=MAX_TOKENS, fisher=False)
    plan = moetrim.make_plan(model, profile, granularity="replace", ratio=0.25, rank=4)
    assert isinstance(plan, moetrim.ReplacePlan) and plan.granularity == "replace"
    assert moetrim.apply_plan(model, plan, profile).format == "replaced"
    _same_weights(model, moetrim.load(tmp_path / "cli", dtype="float32"))
    _runs(model)


def test_compress_refuses_what_the_command_refuses(tiny_dirs, calib_text):
    model, tok = _loaded(tiny_dirs["qwen3_moe"])
    with pytest.raises(moetrim.UsageError, match="unknown granularity 'layers'"):
        moetrim.compress(model, str(calib_text), method="layers", tokenizer=tok)
    with pytest.raises(moetrim.UsageError, match="recover_steps applies to replace"):
        moetrim.compress(model, str(calib_text), method="dims", tokenizer=tok, recover_steps=2)
    with pytest.raises(moetrim.UsageError, match="ratio"):
        moetrim.compress(model, str(calib_text), method="dims", ratio=1.5, tokenizer=tok)


def test_recover_trains_a_replaced_model_from_its_teacher(tiny_dirs, calib_text, tmp_path):
    teacher, tok = _loaded(tiny_dirs["qwen3_moe"])
    model, _ = _loaded(tiny_dirs["qwen3_moe"])
    result = moetrim.compress(model, str(calib_text), method="naive", ratio=0.25, rank=4, tokenizer=tok, max_tokens=MAX_TOKENS)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count {i} ", "response": f"to {i + 1}\n"}) + "\n" for i in range(16)))
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    rec = moetrim.recover(result.model, tok, str(data), teacher=teacher, max_steps=2, batch_size=4, seq_len=32, progress=False)
    assert rec.report["steps"] == 2 and rec.report["settings"]["method"] == "recover"
    changed = [k for k, v in rec.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("experts" in k for k in changed)
    with pytest.raises(moetrim.UsageError):
        moetrim.recover(result.model, tok, str(data), teacher=teacher, max_steps=-1)


def test_evaluate_and_routing_health_give_what_the_commands_report(tiny_dirs, calib_text, tmp_path):
    src = tiny_dirs["qwen3_moe"]
    model, tok = _loaded(src)
    res = moetrim.evaluate(model, tok, tasks="math,strings", n=2, batch_size=2)
    assert set(res["accuracy"]) == {"math", "strings"} and res["n"] == {"math": 2, "strings": 2}
    cli("eval", src, "--tasks", "math,strings", "--n", 2, "--batch-size", 2, "--dtype", "float32", "--json", tmp_path / "eval.json")
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["perplexity"] == pytest.approx(res["perplexity"]) and saved["accuracy"] == res["accuracy"]
    with pytest.raises(moetrim.UsageError, match="exclusive"):
        moetrim.evaluate(model, tok, tasks="math", lm_eval="moetrim")
    with pytest.raises(moetrim.UsageError):
        moetrim.evaluate(model, tok, tasks="no-such-domain")

    health = moetrim.routing_health(model, tok, str(calib_text), max_tokens=200)
    assert len(health["layers"]) == len(find_moe_layers(model)) and 0 <= health["summary"]["entropy"] <= 1
    cli("routing", src, "--data", calib_text, "--max-tokens", 200, "--dtype", "float32", "--json", tmp_path / "routing.json")
    saved = json.loads((tmp_path / "routing.json").read_text())
    assert saved["summary"] == pytest.approx(health["summary"])
