"""`moetrim finetune` as a user runs it: outputs, bad input, interruption, and two processes (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moetrim
from moetrim.assets.tiny import save_tiny

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "moetrim.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    save_tiny("qwen3_moe", root / "model")
    g = torch.Generator().manual_seed(0)
    with open(root / "sft.jsonl", "w") as f:
        for _ in range(32):
            a, b = torch.randint(0, 50, (2,), generator=g).tolist()
            f.write(json.dumps({"prompt": f"add {a} {b} =", "response": f" {a + b}\n"}) + "\n")
    return root


def _in_process(*args):
    """The CLI in this process (no interpreter start-up): exit code, stdout, stderr."""
    from typer.testing import CliRunner

    from moetrim.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_finetune_writes_a_loadable_model_and_its_report(ws, tmp_path):
    out = tmp_path / "ft"
    r = _cli("finetune", ws / "model", "--data", ws / "sft.jsonl", "--method", "condenser", "--condensers", "1",
             "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3", "--routing-tokens", "500", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "finetune.json").read_text())
    assert report["steps"] == 4 and set(report["routing"]) == {"before", "after"}
    assert "kl_to_base" in report["routing"]["after"]["summary"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "moetrim_routed" and config["moetrim"]["finetune"]["method"] == "condenser"
    model = moetrim.load(out)
    assert model.model.layers[0].mlp.gate.moetrim_routed_k == 2
    assert "condensers per layer" in r.stdout and not (tmp_path / "ft.checkpoints").exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "magic"], "unknown --method"),
    (["--method", "condenser", "--condensers", "8"], "fewer than the 8 experts"),
    (["--data", "{ws}/empty.jsonl"], "no examples"),
    (["--data", "{ws}/noresp.jsonl"], "'response'"),
    (["--data", "{ws}/missing.jsonl"], "not found"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--out", "{ws}/model"], "input"),
    (["--out", "{ws}/exists"], "already exists"),
    (["--resume"], "no checkpoint"),
    (["--method", "esft", "--lora", "4"], "drop --lora"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ws, args, message):
    (ws / "empty.jsonl").write_text("\n")
    (ws / "noresp.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    (ws / "exists").mkdir(exist_ok=True)
    (ws / "exists" / "keep.txt").write_text("mine")
    base = ["finetune", ws / "model", "--data", ws / "sft.jsonl", "--out", ws / "new", "--max-steps", "2", "--quiet"]
    given = [a.replace("{ws}", str(ws)) for a in args]
    for opt in ("--data", "--out"):
        if opt in given:
            i = base.index(opt)
            del base[i:i + 2]
    before = _listing(ws)
    code, _, err = _in_process(*base, *given)
    assert code == 2, (code, err)
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert _listing(ws) == before


def test_non_moe_model_is_exit_2(tmp_path, ws):
    from transformers import LlamaConfig, LlamaForCausalLM

    from moetrim.assets.tiny import tiny_tokenizer

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    code, _, err = _in_process("finetune", tmp_path / "dense", "--data", ws / "sft.jsonl", "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "no MoE layers" in err
    assert not (tmp_path / "o").exists()


def test_terminated_run_leaves_no_output(ws, tmp_path):
    out = tmp_path / "ft"
    proc = subprocess.Popen([sys.executable, "-m", "moetrim.cli", "finetune", str(ws / "model"), "--data", str(ws / "sft.jsonl"),
                             "--out", str(out), "--max-steps", "100000", "--routing-tokens", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 60
    seen = b""
    while time.time() < deadline and b"it/s" not in seen and b"s/it" not in seen:  # training has started
        seen += os.read(proc.stderr.fileno(), 4096)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ft")]


_TWO = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "moetrim.cli"]


def test_two_gloo_processes_equal_one_with_the_same_global_batch(ws, tmp_path):
    common = ["finetune", ws / "model", "--data", ws / "sft.jsonl", "--method", "condenser", "--condensers", "1",
              "--max-steps", "3", "--lr", "1e-3", "--gamma", "0.01", "--routing-tokens", "0", "--quiet"]
    one = _cli(*common, "--batch-size", "4", "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*_TWO, *map(str, common), "--batch-size", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    ra = json.loads((tmp_path / "one" / "finetune.json").read_text())
    rb = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert rb["processes"] == 2 and ra["condensers"] == rb["condensers"] and ra["bias"] == rb["bias"]
