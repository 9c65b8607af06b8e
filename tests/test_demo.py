"""`moetrim demo` end to end on a small model: every stage runs and results.json has its shape."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moetrim.cli import app


def test_demo_writes_results(tiny_dirs, tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--model", str(tiny_dirs["qwen2_moe"]), "--out", str(out), "--eval-items", "3"])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    for side in ("dense", "compressed"):
        assert set(res[side]["accuracy"]) == {"math", "knowledge", "code", "strings"}
        assert res[side]["weight_bytes"] > 0 and res[side]["decode_tokens_per_s"] > 0
        assert res[side]["prefill_tokens_per_s"] > 0 and res[side]["decode_tokens_per_s_b8"] > 0
    assert res["compressed"]["weight_bytes"] < res["dense"]["weight_bytes"]
    assert abs(res["method"]["removed_fraction"] - 0.5) <= 0.02
    assert (out / "compressed" / "plan.json").is_file()
    assert "accuracy: math" in result.output and "decode tokens/s" in result.output


def test_demo_refuses_non_empty_out(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not empty" in result.output
