"""Calibration statistics against references computed without moetrim's instrumentation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import moetrim
from moetrim.assets.tiny import FAMILIES, tiny_model, tiny_tokenizer
from moetrim.calibrate import calibrate, load_profile
from moetrim.model.view import find_moe_layers


def _seq_loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def brute_force(model, ids):
    """Per sequence: one backward of the plain model w.r.t. its own expert weights.

    Masking dim j of expert e is scaling down[:, j], so dL/dm_ej = <down[:, j], dL/d down[:, j]>;
    the trimming paper's magnitude is sum |dL/dW| over gate row, up row and down column."""
    layers = find_moe_layers(model)
    fisher = {l.index: 0.0 for l in layers}
    gm = {l.index: 0.0 for l in layers}
    for s in range(ids.shape[0]):
        model.zero_grad()
        params = [l.experts.gate_up_proj for l in layers] + [l.experts.down_proj for l in layers]
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in params))
        _seq_loss(model, ids[s : s + 1]).backward()
        for l in layers:
            ex = l.experts
            tr = ex.is_transposed
            down, gdown = ex.down_proj.detach(), ex.down_proj.grad
            if tr:  # [E, I, H]
                dm = (down * gdown).sum(-1)
                g_down = gdown.abs().sum(-1)
            else:  # [E, H, I]
                dm = (down * gdown).sum(1)
                g_down = gdown.abs().sum(1)
            ggu = ex.gate_up_proj.grad
            ggu = ggu.transpose(1, 2) if tr else ggu  # [E, 2I, H]
            I = dm.shape[1]
            if ex.is_concatenated:
                g_gate, g_up = ggu[:, :I], ggu[:, I:]
            else:
                g_gate, g_up = ggu[:, 0::2], ggu[:, 1::2]
            fisher[l.index] = fisher[l.index] + dm.double() ** 2
            gm[l.index] = gm[l.index] + (g_gate.abs().sum(-1) + g_up.abs().sum(-1) + g_down).double()
    for p in model.parameters():
        p.requires_grad_(True)
    return fisher, gm


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_fisher_and_grad_magnitude_match_brute_force(family):
    model = tiny_model(family)
    model.set_experts_implementation("eager")
    ids = torch.randint(0, 127, (3, 20), generator=torch.Generator().manual_seed(5))
    prof = calibrate(model, [ids], seq_len=20, batch_size=3, grad_magnitude=True)
    fisher, gm = brute_force(model, ids)
    for l in find_moe_layers(model):
        ours, ref = prof.get(l.index, "fisher"), fisher[l.index]
        # equal up to a constant factor (here exactly 1: per-sequence mean loss in both)
        scale = (ours * ref).sum() / (ref * ref).sum()
        assert abs(float(scale) - 1.0) < 1e-3
        assert torch.allclose(ours, ref, rtol=1e-3, atol=1e-6 * float(ref.max()))
        assert torch.allclose(prof.get(l.index, "grad_magnitude"), gm[l.index], rtol=1e-3, atol=1e-6 * float(gm[l.index].max()))


def test_grad_magnitude_is_opt_in():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, 127, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = calibrate(model, [ids], seq_len=16)
    with pytest.raises(moetrim.UsageError, match="--grad-magnitude"):
        plain.get(0, "grad_magnitude")
    full = calibrate(model, [ids], seq_len=16, grad_magnitude=True)
    assert torch.equal(plain.get(0, "fisher"), full.get(0, "fisher"))
    with pytest.raises(moetrim.UsageError, match="no-fisher"):
        calibrate(model, [ids], seq_len=16, fisher=False, grad_magnitude=True)


def test_batch_fisher_mode_squares_batch_gradients():
    model = tiny_model("olmoe")
    ids = torch.randint(0, 127, (4, 16), generator=torch.Generator().manual_seed(2))
    per_seq = calibrate(model, [ids], seq_len=16, batch_size=4)
    per_batch = calibrate(model, [ids], seq_len=16, batch_size=4, fisher_mode="batch")
    l = per_seq.layers[0]
    # same first-order sums; squared sums differ (cross terms between sequences)
    assert torch.allclose(per_seq.get(l, "taylor"), per_batch.get(l, "taylor"), rtol=1e-4, atol=1e-9)
    assert not torch.allclose(per_seq.get(l, "fisher"), per_batch.get(l, "fisher"))
    assert torch.allclose(per_batch.get(l, "fisher"), per_batch.get(l, "taylor") ** 2, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_and_activation_statistics(family):
    """Counts, gate sums and activation sums recomputed by hand from the stock modules."""
    model = tiny_model(family)
    ids = torch.randint(0, 127, (2, 16), generator=torch.Generator().manual_seed(4))
    prof = calibrate(model, [ids], seq_len=16, fisher=False)
    assert not prof.has_gradients
    layers = find_moe_layers(model)
    captured = {}

    def grab(layer):
        def hook(mod, args, out):
            captured[layer.index] = (args[0].detach(), args[1].detach(), args[2].detach())
        return hook

    handles = [l.experts.register_forward_hook(grab(l)) for l in layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    for l in layers:
        x, idx, w = captured[l.index]
        T, k = idx.shape
        assert float(prof.get(l.index, "tokens")) == T
        count = torch.bincount(idx.flatten(), minlength=l.num_experts).double()
        assert torch.equal(prof.get(l.index, "count"), count)
        gate_sum = torch.zeros(l.num_experts, dtype=torch.float64).index_add_(0, idx.flatten(), w.flatten().double())
        assert torch.allclose(prof.get(l.index, "gate_sum"), gate_sum, rtol=1e-5)
        # one expert by hand: its activations and output norms
        e = int(idx[0, 0])
        tok = (idx == e).any(1).nonzero().flatten()
        we = l.expert(e)
        act = l.activation()
        gate_pre = x[tok] @ we.gate.t() + (we.gate_bias if we.gate_bias is not None else 0) if we.gate is not None else None
        up_pre = x[tok] @ we.up.t() + (we.up_bias if we.up_bias is not None else 0)
        h = act(gate_pre, up_pre)
        y = h @ we.down.t() + (we.down_bias if we.down_bias is not None else 0)
        assert torch.allclose(prof.get(l.index, "act_abs_sum")[e], h.abs().sum(0).double(), rtol=1e-4, atol=1e-6)
        assert torch.allclose(prof.get(l.index, "act_abs_max")[e], h.abs().amax(0), rtol=1e-5, atol=1e-7)
        assert torch.allclose(prof.get(l.index, "norm_sum")[e], y.norm(dim=-1).sum().double(), rtol=1e-4)
        probs = prof.get(l.index, "prob_sum")
        assert probs.shape == (l.num_experts,) and float(probs.sum()) > 0
        if l.routing == "softmax":
            assert abs(float(probs.sum()) - T) < 1e-3


def test_profile_save_load_merge(tmp_path):
    model = tiny_model("qwen3_moe")
    a = torch.randint(0, 127, (2, 16), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 127, (2, 16), generator=torch.Generator().manual_seed(2))
    pa, pb = calibrate(model, [a], seq_len=16), calibrate(model, [b], seq_len=16)
    both = calibrate(model, [torch.cat([a, b])], seq_len=16, batch_size=2)
    merged = load_profile(pa.save(tmp_path / "a.safetensors")).merge(load_profile(pb.save(tmp_path / "b.safetensors")))
    assert merged.tokens == both.tokens == 64 and merged.sequences == 4
    for key in both.stats:
        assert torch.allclose(merged.stats[key], both.stats[key], rtol=1e-9, atol=1e-12), key
    with pytest.raises(moetrim.UsageError, match="different models"):
        pa.merge(calibrate(tiny_model("qwen3_moe", seed=9), [a], seq_len=16))
    with pytest.raises(moetrim.UsageError, match="no-fisher"):
        pa.merge(calibrate(model, [a], seq_len=16, fisher=False))


def test_profile_api_names_and_errors():
    model = tiny_model("mixtral")
    prof = calibrate(model, [torch.randint(0, 127, (1, 16))], seq_len=16, fisher=False)
    for name in prof.names():
        if name in ("taylor", "fisher", "grad_magnitude"):
            with pytest.raises(moetrim.UsageError, match="no-fisher"):
                prof.get(0, name)
        else:
            assert prof.get(0, name).ndim in (1, 2, 3)
    assert prof.get(0, "act_abs_sum").shape == (8, 32)
    with pytest.raises(moetrim.UsageError, match="unknown statistic"):
        prof.get(0, "bogus")
    with pytest.raises(moetrim.UsageError, match="no MoE layer"):
        prof.get(7, "count")


def test_text_and_jsonl_data(tmp_path):
    model = tiny_model("qwen2_moe")
    tok = tiny_tokenizer()
    (tmp_path / "a.txt").write_text("hello world, this is calibration text.\n\nsecond paragraph here.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello world, this is calibration text."}) + "\n" + json.dumps({"text": "second paragraph here."}) + "\n")
    pa = calibrate(model, str(tmp_path / "a.txt"), tokenizer=tok, seq_len=32)
    pb = calibrate(model, str(tmp_path / "b.jsonl"), tokenizer=tok, seq_len=32)
    assert pa.tokens == pb.tokens > 40
    assert pa.meta["data_digest"] == pb.meta["data_digest"]
    ps = calibrate(model, ["hello world, this is calibration text.", "second paragraph here."], tokenizer=tok, seq_len=32)
    assert ps.meta["data_digest"] == pa.meta["data_digest"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(moetrim.UsageError, match="'text'"):
        calibrate(model, str(tmp_path / "bad.jsonl"), tokenizer=tok)
    with pytest.raises(moetrim.UsageError, match="empty"):
        calibrate(model, [torch.tensor([5])])


def test_max_tokens_and_model_left_untouched():
    model = tiny_model("olmoe")
    before = {n: p.clone() for n, p in model.named_parameters()}
    modules_before = [type(m) for m in model.modules()]
    ids = torch.randint(0, 127, (6, 16), generator=torch.Generator().manual_seed(8))
    prof = calibrate(model, [ids], seq_len=16, max_tokens=40, seed=3)
    assert prof.tokens == 40
    assert [type(m) for m in model.modules()] == modules_before
    assert all(torch.equal(before[n], p) and p.requires_grad for n, p in model.named_parameters())
    assert prof.meta["data_digest"] == calibrate(model, [ids], seq_len=16, max_tokens=40, seed=3).meta["data_digest"]
