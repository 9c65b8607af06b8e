"""Routing health: statistics against hand computation on models whose routing is known, the base
comparison, condenser columns left out, and the `routing` command's outputs and one-line refusals."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from moetrim.assets.tiny import save_tiny, tiny_model, tiny_tokenizer
from moetrim.cli import app
from moetrim.errors import UsageError
from moetrim.evaluate.routing import routing_health, share_statistics
from moetrim.model.view import find_moe_layers

runner = CliRunner()
TEXTS = [f"the cat {i} sat on a mat while dogs ran over green hills" * 3 for i in range(8)]
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_share_statistics_extremes() -> None:
    one = share_statistics([1.0, 0.0, 0.0, 0.0])
    assert one["entropy"] == 0 and one["gini"] == pytest.approx(0.75) and one["top10_share"] == 1.0
    assert one["dead"] == 3 and one["dead_experts"] == [1, 2, 3]
    flat = share_statistics([0.25] * 4)
    assert flat["entropy"] == pytest.approx(1) and flat["gini"] == pytest.approx(0, abs=1e-12)
    assert flat["dead"] == 0 and flat["top10_share"] == pytest.approx(0.25)
    # over a subset of experts (condensers left out), shares are renormalised over that subset
    assert share_statistics([0.3, 0.3, 0.4], experts=[0, 1])["entropy"] == pytest.approx(1)
    # Gini by its definition: mean absolute difference over all pairs / (2 * mean)
    f = [0.1, 0.2, 0.3, 0.4]
    mad = sum(abs(a - b) for a in f for b in f) / len(f) ** 2
    assert share_statistics(f)["gini"] == pytest.approx(mad / (2 * sum(f) / len(f)))


def test_known_routing_matches_hand_computation() -> None:
    """A GPT-OSS router with zero weight and a bias: every token routes to experts 0 and 1 with router
    probabilities softmax(bias), whatever the input."""
    model, tok = tiny_model("gpt_oss"), tiny_tokenizer()
    bias = torch.tensor([4.0, 3.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0])
    layers = find_moe_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.router.weight.zero_()
            layer.router.bias.copy_(bias)
    r = routing_health(model, tok, TEXTS, seq_len=32, max_tokens=100, batch_size=2)
    assert r["tokens"] == 100 and r["sequences"] == 4  # 32+32+32+4: the short last chunk counts its 4 tokens only
    for rep in r["layers"]:
        assert rep["token_share"] == [0.5, 0.5] + [0.0] * 6
        assert rep["mean_prob"] == pytest.approx(bias.softmax(-1).tolist(), abs=1e-6)
        assert rep["entropy"] == pytest.approx(math.log(2) / math.log(8))
        assert rep["gini"] == pytest.approx(0.75)  # sorted shares 0 x6, 1/2 x2: 2*(7+8)/2/8 - 9/8
        assert rep["dead"] == 6 and rep["dead_experts"] == [2, 3, 4, 5, 6, 7]
        assert rep["top10_share"] == pytest.approx(0.5) and rep["top_k"] == 2 and rep["condensers"] == []
    assert r["summary"]["dead"] == 6 * len(layers) and r["summary"]["gini"] == pytest.approx(0.75)


def _rewrite_routing(model, fn) -> list:
    """Install `fn(router, output) -> output` as a forward hook on every router (before routing_health's)."""
    return [l.router.register_forward_hook(lambda mod, args, out: fn(mod, out)) for l in find_moe_layers(model)]


def test_uniform_routing_and_self_comparison() -> None:
    model, tok = tiny_model("qwen3_moe"), tiny_tokenizer()
    r = routing_health(model, tok, TEXTS, seq_len=32, base=copy.deepcopy(model))
    for rep in r["layers"]:
        assert rep["kl_to_base"] == pytest.approx(0, abs=1e-7) and rep["topk_overlap"] == 1.0
        assert rep["base_token_share"] == rep["token_share"]
    assert r["summary"]["topk_overlap"] == 1.0

    def cycle(router, out):  # token t goes to experts t % 8 and (t + 1) % 8: every expert gets 1/8
        t = torch.arange(out[2].shape[0])
        return out[0], out[1], torch.stack([t % 8, (t + 1) % 8], dim=1)

    handles = _rewrite_routing(model, cycle)
    try:
        r = routing_health(model, tok, TEXTS, seq_len=32, max_tokens=64)  # 2 sequences of 32: a multiple of 8
    finally:
        for h in handles:
            h.remove()
    for rep in r["layers"]:
        assert rep["token_share"] == [0.125] * 8 and rep["dead"] == 0
        assert rep["entropy"] == pytest.approx(1) and rep["gini"] == pytest.approx(0, abs=1e-12)
        assert rep["top10_share"] == pytest.approx(0.125)


@pytest.mark.parametrize("declared", [True, False])
def test_condenser_columns_are_left_out(declared: bool) -> None:
    """A hook that appends an always-active expert 7 (weight 0, so the model computes the same) as the
    fine-tuning code does: with `moetrim_routed_k` the extra column is a condenser, not a routed choice."""
    model, tok = tiny_model("qwen3_moe"), tiny_tokenizer()
    plain = routing_health(model, tok, TEXTS, seq_len=32)

    def add_condenser(router, out):
        n = out[2].shape[0]
        return (out[0], torch.cat([out[1], out[1].new_zeros(n, 1)], 1), torch.cat([out[2], out[2].new_full((n, 1), 7)], 1))

    handles = _rewrite_routing(model, add_condenser)
    try:
        counted = routing_health(model, tok, TEXTS, seq_len=32)  # no moetrim_routed_k: three routed columns
        for layer in find_moe_layers(model):
            layer.router.moetrim_routed_k = 2
            if declared:
                layer.router.register_buffer("moetrim_condensers", torch.tensor([7]))
        r = routing_health(model, tok, TEXTS, seq_len=32)
    finally:
        for h in handles:
            h.remove()
    for rep, ref, with_column in zip(r["layers"], plain["layers"], counted["layers"]):
        assert rep["token_share"] == ref["token_share"] and rep["mean_prob"] == pytest.approx(ref["mean_prob"])
        assert with_column["token_share"][7] > ref["token_share"][7] and with_column["top_k"] == 3
        assert rep["top_k"] == 2 and rep["condensers"] == [7] and 7 not in rep["dead_experts"]
        routable = [e for e in range(8) if e != 7]
        assert rep["entropy"] == pytest.approx(share_statistics(ref["token_share"], routable)["entropy"])


def test_base_of_another_structure_is_refused() -> None:
    model, tok = tiny_model("qwen3_moe"), tiny_tokenizer()
    for base in (tiny_model("qwen2_moe"), tiny_model("qwen3_moe", num_experts=4)):
        with pytest.raises(UsageError, match="--base has"):
            routing_health(model, tok, TEXTS, base=base)
    with pytest.raises(UsageError, match="empty"):
        routing_health(model, tok, [""])


def test_cli_writes_table_json_and_png(tiny_dirs, calib_text, tmp_path) -> None:
    d = tiny_dirs["qwen3_moe"]
    j, p = tmp_path / "r.json", tmp_path / "r.png"
    code, text = run("routing", d, "--data", calib_text, "--base", d, "--seq-len", 32, "--json", j, "--png", p)
    assert code == 0, text
    assert "top-k overlap" in text and "mean" in text
    report = json.loads(j.read_text())
    assert report["tokens"] > 0 and len(report["layers"]) == 3 and report["summary"]["topk_overlap"] == 1.0
    assert p.read_bytes()[:8] == PNG
    from PIL import Image

    with Image.open(p) as image:  # marked as moetrim's, so that --overwrite may replace it
        assert image.text["moetrim_report"] == "routing"
    assert report["moetrim_report"] == "routing"
    assert run("routing", d, "--data", calib_text, "--json", j)[0] == 2  # exists: refused without --overwrite
    assert run("routing", d, "--data", calib_text, "--json", j, "--png", p, "--overwrite")[0] == 0
    assert "kl_to_base" not in json.loads(j.read_text())["summary"]


def _dense(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("case,match", [
    ("missing_data", "data file not found"),
    ("empty_data", "routing data is empty"),
    ("dense_model", "no MoE layers"),
    ("base_other_layers", "--base has 2 MoE layers"),
    ("base_other_experts", "of 4 experts"),
    ("same_outputs", "both name"),
    ("png_in_model", "is inside the input"),
    ("json_is_data", "is the input"),
    ("foreign_png", "not a moetrim PNG report"),
    ("seq_len", "--seq-len must be at least 2"),
])
def test_cli_bad_inputs_exit_2_and_write_nothing(case, match, tiny_dirs, calib_text, tmp_path) -> None:
    d, outs = tiny_dirs["qwen3_moe"], tmp_path / "outs"
    outs.mkdir()
    j, p = outs / "r.json", outs / "r.png"
    data, model, extra = calib_text, d, []
    if case == "missing_data":
        data = tmp_path / "nope.txt"
    elif case == "empty_data":
        data = tmp_path / "empty.txt"
        data.write_text("\n\n")
    elif case == "dense_model":
        model = _dense(tmp_path / "dense")
    elif case == "base_other_layers":
        extra = ["--base", tiny_dirs["qwen2_moe"]]
    elif case == "base_other_experts":
        extra = ["--base", save_tiny("qwen3_moe", tmp_path / "four", num_experts=4)]
    elif case == "same_outputs":
        p = j
    elif case == "png_in_model":
        p = d / "r.png"
    elif case == "json_is_data":
        j = data
    elif case == "foreign_png":
        p.write_text("my notes")
        extra = ["--overwrite"]
    elif case == "seq_len":
        extra = ["--seq-len", 1]
    before = sorted(x.name for x in outs.iterdir())
    code, text = run("routing", model, "--data", data, "--json", j, "--png", p, *extra)
    assert code == 2, text
    assert match in text and "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert sorted(x.name for x in outs.iterdir()) == before and not (d / "r.png").exists()
