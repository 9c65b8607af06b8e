"""The CUDA paths (marked `cuda`; `scripts/gpu_check.sh` runs them on a lent GPU): variable-width and
replaced experts in bf16 against the stock experts, training steps, and a calibration spread over the GPU
and the CPU. Without a GPU they skip. `MOETRIM_TEST_DEVICE=cpu` runs the same tests on the CPU (in bf16
where they ask for it), so their logic is checked before GPU minutes are spent on them."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import moetrim
from moetrim.assets.tiny import FAMILIES, save_tiny, tiny_model, tiny_tokenizer
from moetrim.model.replaced import ReplacedExperts
from moetrim.model.varwidth import VariableWidthExperts
from moetrim.model.view import find_moe_layers
from moetrim.plan import make_plan

DEVICE = os.environ.get("MOETRIM_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)"),
]
IDS = torch.randint(0, 127, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 references in full precision (TF32 would make them as coarse as what they check)."""
    if torch.cuda.is_available():
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = before
    else:
        yield


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_varwidth_in_bf16_is_as_close_to_fp32_as_stock_is(family):
    """Full width in bf16 on the device: moetrim's module is as exact as the stock experts are, both
    measured against the fp32 model; trimmed, the bf16 device model follows its own fp32 CPU copy."""
    base = tiny_model(family)
    ref = _logits(base)
    stock = copy.deepcopy(base).to(DEVICE, torch.bfloat16)
    full = copy.deepcopy(base)
    moetrim.apply_plan(full, make_plan(full, None, criterion="random", ratio=0.0), force_varwidth=True)
    full = full.to(DEVICE, torch.bfloat16)
    assert all(isinstance(l.experts, VariableWidthExperts) for l in find_moe_layers(full))
    stock_err, ours_err = _rel(_logits(stock), ref), _rel(_logits(full), ref)
    assert ours_err <= 2 * stock_err + 1e-3, (ours_err, stock_err)
    trimmed = copy.deepcopy(base)
    moetrim.apply_plan(trimmed, make_plan(trimmed, None, criterion="random", ratio=0.5, allocation="global", seed=1))
    ref_trimmed = _logits(trimmed)
    assert _rel(_logits(trimmed.to(DEVICE, torch.bfloat16)), ref_trimmed) <= 2 * stock_err + 1e-3


@pytest.mark.parametrize("tokens", [1, 8, 200])
def test_replaced_in_bf16_equals_each_slot_and_reads_nothing_back(tokens):
    """The grouped path in bf16 (the dtype torch's CUDA grouped GEMM takes) equals Σ w·expert_e(x) computed
    per slot in fp32 on the CPU, and reads no value back to the host: decode can be captured in a graph."""
    from test_replaced import _slot_sum
    from test_train_waste import _SyncCounter

    gen = torch.Generator().manual_seed(3)
    mod = ReplacedExperts(8, 64, 32, [0, 1, 2, 3], [[4, 5], [6, 7]], 8, lambda g, u: F.silu(g) * u)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    x = torch.randn(tokens, 64, generator=gen)
    index = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(tokens)])
    index[0] = torch.tensor([4, 5])
    weights = torch.rand(tokens, 2, generator=gen)
    expected = _slot_sum(mod, x, index, weights)
    dev = copy.deepcopy(mod).to(DEVICE, torch.bfloat16)
    import moetrim.model.replaced as replaced_module

    saved, replaced_module._HOST_SLOTS = replaced_module._HOST_SLOTS, 0  # the device path, also on a CPU dry run
    try:
        counter = _SyncCounter()
        with torch.no_grad(), counter:
            out = dev(x.to(DEVICE, torch.bfloat16), index.to(DEVICE), weights.to(DEVICE))
    finally:
        replaced_module._HOST_SLOTS = saved
    assert out.device.type == torch.device(DEVICE).type and out.dtype == torch.bfloat16
    assert _rel(out, expected) < 2e-2
    assert counter.count == 0


@pytest.mark.parametrize("method", ["full", "condenser"])
def test_training_steps_run_on_the_device_and_move_the_weights(method):
    from finetune_cases import records

    from moetrim.train import FinetuneConfig, finetune

    model = tiny_model("qwen3_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = FinetuneConfig(method=method, lr=1e-3, max_steps=3, batch_size=4, seq_len=64, progress=False, logging_steps=1,
                         device=DEVICE if DEVICE == "cuda" else "cpu", bf16=DEVICE == "cuda")
    res = finetune(model, tiny_tokenizer(), records(), cfg)
    losses = [p["loss"] for p in res.report["loss_curve"]]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in res.model.named_parameters() if not torch.equal(p.detach().cpu().float(), before[n].float())]
    assert any(".experts." in n for n in moved), moved


def test_recovery_of_replaced_experts_trains_on_the_device():
    from finetune_cases import records

    from moetrim.apply.replace import build_replaced
    from moetrim.model.replaced import install_layer
    from moetrim.train import FinetuneConfig, finetune

    teacher = tiny_model("olmoe")
    model = copy.deepcopy(teacher)
    for layer in find_moe_layers(model):
        install_layer(model, layer, build_replaced(layer, [0, 1, 2, 3], [[4, 5], [6, 7]], 8))
    factor = find_moe_layers(model)[0].experts.gate_a.detach().clone()
    cfg = FinetuneConfig(method="recover", lr=1e-3, max_steps=3, batch_size=4, seq_len=64, progress=False, logging_steps=1,
                         device=DEVICE if DEVICE == "cuda" else "cpu")
    res = finetune(model, tiny_tokenizer(), records(), cfg, teacher=teacher)
    assert all(torch.isfinite(torch.tensor([p["loss"] for p in res.report["loss_curve"]])))
    assert not torch.equal(find_moe_layers(res.model)[0].experts.gate_a.detach().cpu(), factor)


def test_calibration_across_the_device_and_the_cpu_equals_one_device(tmp_path):
    """Half the decoder on the device, half on the CPU (a device map): the profile one CPU process gives."""
    from moetrim.calibrate import calibrate
    from moetrim.checkpoint import load_model

    path = save_tiny("qwen3_moe", tmp_path / "m")
    ids = [torch.randint(0, 127, (24,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    plain = calibrate(load_model(path), ids, batch_size=2)
    gpu = 0 if DEVICE == "cuda" else "cpu"
    split = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "model.layers.0": gpu, "model.layers.1": "cpu",
             "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    placed = calibrate(load_model(path, device_map=split), ids, batch_size=2)
    assert set(placed.stats) == set(plain.stats)
    for k in plain.stats:
        torch.testing.assert_close(placed.stats[k].cpu(), plain.stats[k], rtol=2e-3, atol=1e-6, msg=k)
