"""Several processes: every fine-tuning method run by two gloo processes (batch 2 each) gives the model
one process gives with batch 4; transformers' load-balancing loss summed over processes; FSDP limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moetrim
from moetrim.assets.tiny import tiny_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from finetune_cases import records, run_case  # noqa: E402

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent / "src"), os.environ.get("PYTHONPATH")) if p)}

# every method, with a load-balancing weight large enough to matter and the bias modes that all-reduce counts
CASES = ["full=full,aux_coef:1.0", "auxfree=auxfree", "balance=auxfree,bias:balance,bias_apply:selection",
         "sparsify=auxfree,bias:sparsify", "esft=esft,esft_threshold:0.5", "densemixer=densemixer",
         "condenser=condenser,condensers:1"]


def test_balance_loss_in_one_process_is_transformers_own():
    from moetrim.model.view import find_moe_layers
    from moetrim.train.balance_loss import balance_loss

    ids = torch.randint(0, 120, (3, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    grads = []
    for ours in (False, True):
        model = tiny_model("qwen3_moe", norm_topk_prob=True)
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        layer = find_moe_layers(model)[0]
        loss = balance_loss(out.router_logits, layer.num_experts, layer.top_k, mask) if ours else out.aux_loss
        loss.backward()
        grads.append((loss.detach(), layer.router_weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


def test_two_gloo_processes_equal_one_for_every_method(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                        str(HERE / "dist_finetune.py"), str(tmp_path), "2", *CASES],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for case in CASES:
        name = case.split("=", 1)[0]
        one = run_case(case, 4)
        two = load_file(tmp_path / f"{name}.safetensors")
        a = one.model.state_dict()
        assert set(a) == set(two), name
        for key in a:
            torch.testing.assert_close(two[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["processes"] == 2
        for key in ("trainable_parameters", "bias", "condensers", "esft"):
            assert report.get(key) == one.report.get(key), (name, key)


def test_esft_under_fsdp_is_refused_in_one_line(monkeypatch):
    """ESFT masks the gradients of the frozen experts with hooks on the expert tensors; FSDP flattens or
    shards those tensors into new parameters, where the hooks never fire."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(moetrim.UsageError, match="esft.*FSDP"):
        run_case("esft=esft", 4)
    assert records()  # the data itself is fine
