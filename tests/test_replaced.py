"""Replaced experts (group base + low-rank corrections): same function where it must be, the merge
semantics of HC-SMoE, exact parameter accounting, save/load, training, clustering and refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

import moetrim
from moetrim.assets.tiny import tiny_model
from moetrim.apply.replace import build_replaced, low_rank
from moetrim.model.replaced import REPLACED_KEY, ReplacedExperts, install_layer, replaced_param_count
from moetrim.model.view import find_moe_layers
from moetrim.plan.cluster import cluster_experts, mean_outputs

from helpers import auto_equals_moetrim_load, plain_transformers_error, run_logits

FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3"]
IDS = torch.randint(0, 127, (2, 24), generator=torch.Generator().manual_seed(0))
KEPT, GROUPS = [0, 5], [[1, 4, 7], [2], [3, 6]]  # tiny models have 8 experts of width 32, hidden 64


def _replace(model, kept=KEPT, groups=GROUPS, rank=4, layers=None, **kw):
    """Replace experts in every MoE layer (or those indexed by `layers`, a dict index -> rank)."""
    for layer in find_moe_layers(model):
        if layers is None or layer.index in layers:
            r = rank if layers is None else layers[layer.index]
            install_layer(model, layer, build_replaced(layer, kept, groups, r, **kw))
    return model


def _close(a, b, tol=2e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_reproduces_the_original_and_singleton_merge_is_identity(family):
    """At rank = width every correction is exact (a difference of two [I, H] matrices has rank <= I),
    so any grouping reproduces the model; a rank-0 group of one is its member itself."""
    base = tiny_model(family)
    ref = run_logits(base, IDS)
    assert _close(run_logits(_replace(copy.deepcopy(base), rank=32), IDS), ref)
    singles = [[e] for e in range(8) if e not in KEPT]
    assert _close(run_logits(_replace(copy.deepcopy(base), groups=singles, rank=0), IDS), ref)
    # whitened (a Gram per expert) is exact at full rank too, and a real change below it
    prof = moetrim.calibrate(base, [IDS], seq_len=24, fisher=False, whiten=True)
    grams = {l: prof.get(l, "in_gram") for l in prof.layers}
    m = copy.deepcopy(base)
    for layer in find_moe_layers(m):
        install_layer(m, layer, build_replaced(layer, KEPT, GROUPS, 32, gram=grams[layer.index]))
    assert _close(run_logits(m, IDS), ref)
    assert not _close(run_logits(_replace(copy.deepcopy(base), rank=2), IDS), ref, tol=1e-3)


@pytest.mark.parametrize("host_slots", [0, 1 << 30])  # the grouped path; the CPU's walk for a few slots
def test_merged_group_is_the_weighted_average_and_runs_once_with_summed_weight(host_slots, monkeypatch):
    import moetrim.model.replaced as replaced_module

    monkeypatch.setattr(replaced_module, "_HOST_SLOTS", host_slots)
    model = tiny_model("qwen3_moe")
    layer = find_moe_layers(model)[0]
    mod = build_replaced(layer, [0, 2, 3, 5, 6, 7], [[1, 4]], 0, base_weights={1: 3.0, 4: 1.0})
    w1, w4 = layer.expert(1), layer.expert(4)
    gate, up, down = (0.75 * getattr(w1, n) + 0.25 * getattr(w4, n) for n in ("gate", "up", "down"))
    assert torch.allclose(mod.base_gate_up[0], torch.cat([gate, up]), atol=1e-7)
    assert torch.allclose(mod.base_down[0], down, atol=1e-7)

    def by_hand(g, u, d, x):
        return d @ (F.silu(g @ x) * (u @ x))

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([[1, 4], [1, 0], [2, 3]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    stock = [layer.expert(e) for e in range(8)]
    expected = torch.stack([
        1.0 * by_hand(gate, up, down, x[0]),  # both members: the merged expert once, weight 0.6 + 0.4
        0.7 * by_hand(gate, up, down, x[1]) + 0.3 * by_hand(stock[0].gate, stock[0].up, stock[0].down, x[1]),
        sum(0.5 * by_hand(stock[e].gate, stock[e].up, stock[e].down, x[2]) for e in (2, 3)),
    ])

    class Count(TorchFunctionMode):
        rows: list[int] = []  # rows each base gate/up product computes (a grouped GEMM computes up to its last offset)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (F.grouped_mm, torch._grouped_mm) and args[1].data_ptr() == mod.base_gate_up.data_ptr():
                self.rows.append(int(kwargs["offs"][-1]))
            if func is F.linear and args[1].data_ptr() == mod.base_gate_up.data_ptr():  # the CPU's walk for a few slots
                self.rows.append(args[0].shape[0])
            return func(*args, **kwargs)

    with torch.no_grad(), Count() as count:
        out = mod(x, index, weights)
    assert torch.allclose(out, expected, atol=1e-6)
    assert count.rows == [2]  # one base call, on the two distinct tokens (token 0 picked both members)


def test_parameter_count_equals_the_saved_tensors(tmp_path):
    model = _replace(tiny_model("olmoe"), layers={0: 4, 2: 0})  # layer 1 stays stock
    out = moetrim.save(model, tmp_path / "r")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        saved = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for layer in find_moe_layers(model):
        prefix = f"model.layers.{layer.index}.mlp.experts."
        numel = sum(torch.Size(s).numel() for k, s in saved.items() if k.startswith(prefix))
        if isinstance(layer.experts, ReplacedExperts):
            ex = layer.experts
            assert ex.param_count() == numel == layer.routed_params()
            assert numel == replaced_param_count(64, 32, kept=2, groups=3, replaced=6, rank=ex.rank)
        else:
            assert numel == 8 * 3 * 64 * 32
    assert moetrim.routed_expert_param_count(model) == sum(replaced_param_count(64, 32, 2, 3, 6, r) for r in (4, 0)) + 8 * 3 * 64 * 32
    # rank 0 stores no factor tensors at all
    assert not any(k.startswith("model.layers.2.mlp.experts.gate_a") for k in saved)


def test_save_load_roundtrip_and_plain_transformers_refuses(tmp_path):
    model = _replace(tiny_model("qwen2_moe"), layers={0: 3, 2: 0})
    before = run_logits(model, IDS)
    out = moetrim.save(model, tmp_path / "r")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "moetrim_replaced" and cfg["moetrim_base_model_type"] == "qwen2_moe"
    assert cfg[REPLACED_KEY]["layers"]["0"] == {"num_experts": 8, "width": 32, "kept": KEPT, "groups": GROUPS, "rank": 3}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[REPLACED_KEY]) == cfg[REPLACED_KEY]
    loaded = moetrim.load(out)
    assert isinstance(find_moe_layers(loaded)[0].experts, ReplacedExperts)
    assert torch.equal(run_logits(loaded, IDS), before)
    meta = moetrim.load(out, meta=True)
    assert isinstance(find_moe_layers(meta)[1].experts, ReplacedExperts)
    assert "moetrim_replaced" in plain_transformers_error(out)
    assert auto_equals_moetrim_load(out, IDS)
    # an edit that keeps every shape (two experts swapped between groups) is caught by the weights' record
    cfg[REPLACED_KEY]["layers"]["0"]["groups"] = [[1, 4, 6], [2], [3, 7]]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(moetrim.MoetrimError, match="disagrees with its weight files at layer 0"):
        moetrim.load(out)
    cfg[REPLACED_KEY]["layers"]["0"]["groups"] = [[1, 4], [2], [3, 6]]  # expert 7 in no group
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(moetrim.MoetrimError, match="layer 0: experts \\[7\\] are neither kept, novices nor in a group"):
        moetrim.load(out)


def test_training_reaches_kept_experts_bases_and_factors():
    model = _replace(tiny_model("mixtral"), rank=4)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    ex = find_moe_layers(model)[0].experts
    for name, p in ex.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    m = ex.member_of_expert[2]  # a group of one: Δ = 0, yet its B factors learn (A holds unit vectors)
    assert float(ex.gate_b.grad[m].abs().sum()) > 0 and float(ex.gate_a[m].detach().norm()) > 0
    # a few steps lower the loss (autograd through index_add_ and the shared activation works)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_zero_init_starts_as_the_merge_and_learns_through_b():
    base = tiny_model("qwen3_moe")
    merged = run_logits(_replace(copy.deepcopy(base), rank=0), IDS)
    naive = _replace(copy.deepcopy(base), rank=4, init="zero", seed=3)
    assert _close(run_logits(naive, IDS), merged)
    ex = find_moe_layers(naive)[0].experts
    again = find_moe_layers(_replace(copy.deepcopy(base), rank=4, init="zero", seed=3))[0].experts
    assert torch.equal(ex.gate_a, again.gate_a) and float(ex.gate_a.detach().abs().sum()) > 0 and float(ex.gate_b.detach().abs().sum()) == 0
    naive(input_ids=IDS, labels=IDS).loss.backward()
    assert float(ex.gate_b.grad.abs().sum()) > 0 and float(ex.down_b.grad.abs().sum()) > 0


def test_whitened_low_rank_minimises_the_error_on_the_inputs():
    gen = torch.Generator().manual_seed(4)
    delta = torch.randn(16, 24, generator=gen, dtype=torch.float64)
    x = torch.randn(200, 24, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
    chol = torch.linalg.cholesky(x.T @ x)

    def err(a, b):
        return float(((delta - b @ a) @ x.T).norm())

    plain, white = low_rank(delta, 4), low_rank(delta, 4, chol)
    assert err(*white) < 0.9 * err(*plain)
    assert float((delta - plain[1] @ plain[0]).norm()) < float((delta - white[1] @ white[0]).norm())  # plain wins unweighted
    a, b = low_rank(delta, 16, chol)
    assert torch.allclose(b @ a, delta, atol=1e-9)


def test_view_sees_replaced_layers_and_compression_refuses_them():
    base = tiny_model("olmoe")
    model = _replace(copy.deepcopy(base), rank=32)
    layer = find_moe_layers(model)[0]
    assert layer.widths == [32] * 8 and layer.num_experts == 8 and layer.gated and not layer.has_bias
    original = find_moe_layers(base)[0].expert(4)
    with torch.no_grad():
        eff = layer.expert(4)  # replaced: base + B A, at full rank the original weights
        assert all(torch.allclose(getattr(eff, n), getattr(original, n), atol=1e-5) for n in ("gate", "up", "down"))
        assert layer.expert(5).up.data_ptr() == layer.experts.kept_gate_up[1, 32:].data_ptr()  # kept: views
    with pytest.raises(moetrim.UsageError, match="already replaced"):
        moetrim.calibrate(model, [IDS], seq_len=24, fisher=False)
    with pytest.raises(moetrim.UsageError, match="already replaced"):
        build_replaced(layer, KEPT, GROUPS, 0)


def test_clustering_is_deterministic_and_respects_max_group():
    gen = torch.Generator().manual_seed(5)
    centres = torch.randn(3, 64, generator=gen)
    planted = {0: 0, 3: 0, 5: 0, 1: 1, 2: 1, 4: 2, 6: 2, 7: 2}
    feats = torch.stack([centres[planted[e]] * (1 + e) + 0.05 * torch.randn(64, generator=gen) for e in range(8)])
    assert cluster_experts(feats, range(8), max_group=3) == [[0, 3, 5], [1, 2], [4, 6, 7]]
    assert cluster_experts(feats, [7, 6, 5, 4, 3, 2, 1, 0], max_group=3) == [[0, 3, 5], [1, 2], [4, 6, 7]]
    two = cluster_experts(feats, range(8), max_group=2)
    assert max(map(len, two)) <= 2 and sorted(e for g in two for e in g) == list(range(8))
    assert cluster_experts(feats, [1, 2, 4], max_group=8, num_groups=1) == [[1, 2, 4]]
    assert cluster_experts(feats, [1, 2, 4], max_group=8, num_groups=3) == [[1], [2], [4]]
    feats[6] = 0  # an unused expert is similar to nothing, but still grouped somewhere
    assert sorted(e for g in cluster_experts(feats, range(8), max_group=4) for e in g) == list(range(8))
    for bad in ({"max_group": 0}, {"max_group": 2, "num_groups": 9}):
        with pytest.raises(moetrim.UsageError):
            cluster_experts(feats, range(8), **bad)
    # on a real profile: mean outputs out_sum / count
    model = tiny_model("qwen3_moe")
    prof = moetrim.calibrate(model, [IDS], seq_len=24, fisher=False)
    feats = mean_outputs(prof, 0)
    assert feats.shape == (8, 64)
    groups = cluster_experts(feats, [1, 2, 3, 4, 6, 7], max_group=3)
    assert groups == cluster_experts(feats, [1, 2, 3, 4, 6, 7], max_group=3) and max(map(len, groups)) <= 3


@pytest.mark.parametrize("kept,groups,rank,match", [
    (KEPT, GROUPS, -1, "rank must be a whole number >= 0"),
    (KEPT, GROUPS, 33, "rank 33 is more than the experts' width 32"),
    ([0, 1, 5], GROUPS, 2, "experts \\[1\\] are both kept and replaced"),
    (KEPT, [[1, 4], [2], [3, 6]], 2, "experts \\[7\\] are neither kept, novices nor in a group"),
    (KEPT, [[1, 4, 7], [2, 4], [3, 6]], 2, "experts \\[4\\] are in more than one group"),
    (KEPT, [[1, 4, 7], [2], [3, 6], []], 2, "every group needs at least one member"),
    ([0, 9], GROUPS, 2, "out of range"),
])
def test_bad_layouts_raise_one_line(kept, groups, rank, match):
    layer = find_moe_layers(tiny_model("qwen3_moe"))[0]
    with pytest.raises(moetrim.UsageError, match=match) as info:
        build_replaced(layer, kept, groups, rank)
    assert "\n" not in str(info.value)


def test_bad_options_and_biased_families_are_refused():
    layer = find_moe_layers(tiny_model("qwen3_moe"))[0]
    with pytest.raises(moetrim.UsageError, match="unknown init"):
        build_replaced(layer, KEPT, GROUPS, 2, init="random")
    with pytest.raises(moetrim.UsageError, match="gram must be"):
        build_replaced(layer, KEPT, GROUPS, 2, gram=torch.zeros(8, 64, 63))
    with pytest.raises(moetrim.UsageError, match="no weight for experts \\[7\\]"):
        build_replaced(layer, KEPT, GROUPS, 2, base_weights={1: 1.0, 4: 1.0, 2: 1.0, 3: 1.0, 6: 1.0})
    with pytest.raises(moetrim.UsageError, match=">= 0"):
        build_replaced(layer, KEPT, GROUPS, 2, base_weights={e: -1.0 for e in range(8)})
    gpt = find_moe_layers(tiny_model("gpt_oss"))[0]
    with pytest.raises(moetrim.MoetrimError, match="biases") as info:
        build_replaced(gpt, KEPT, GROUPS, 2)
    assert type(info.value) is moetrim.MoetrimError


def _slot_sum(mod: ReplacedExperts, x, index, weights):
    """Σ over a token's slots of w · expert_e(x), each expert from its effective weights W_base + BA."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(index[t].tolist(), weights[t].tolist()):
            ew = mod.expert_weights(e)
            out[t] += w * (ew.down @ (F.silu(ew.gate @ x[t]) * (ew.up @ x[t])))
    return out


@pytest.mark.parametrize("tokens", [1, 5, 40])  # 40 tokens x top-2 = 80 rows: past the gathered-bmm size
@pytest.mark.parametrize("kept,groups,rank,hidden,width", [
    (KEPT, GROUPS, 4, 64, 32),          # grouped GEMMs (16-byte aligned)
    ([], [[0, 1, 2, 3, 4, 5, 6, 7]], 4, 64, 32),  # D²-MoE: one base, every expert a delta
    ([0, 1, 2, 3], [[4, 5], [6, 7]], 0, 64, 32),  # merge: no factors
    (KEPT, GROUPS, 3, 66, 30),          # misaligned: the fallbacks
])
@pytest.mark.parametrize("path", ["grouped", "host", "host-in-place"])
def test_grouped_forward_equals_each_slot_computed_alone_and_never_reads_the_host(tokens, kept, groups, rank, hidden, width,
                                                                                  path, monkeypatch):
    """The forward equals Σ w·expert_e(x) per slot whatever the layout and token count, and the grouped path
    (every device; the CPU's too past a few slots) reads no value back to the host (no .tolist/.item/unique/
    nonzero): decode stays on the device, graph-capturable. The CPU's host walk for a few slots agrees."""
    from test_train_waste import _SyncCounter

    import moetrim.model.replaced as replaced_module

    monkeypatch.setattr(replaced_module, "_HOST_SLOTS", 0 if path == "grouped" else 1 << 30)
    if path == "host-in-place":  # the walk as real shapes take it: factor rows read in place, not gathered
        monkeypatch.setattr(replaced_module, "_HOST_ELEMENTS", 0)
        monkeypatch.setattr(replaced_module, "_HOST_SLOTS_ANY", 1 << 30)

    gen = torch.Generator().manual_seed(3)
    mod = ReplacedExperts(8, hidden, width, kept, groups, rank, lambda g, u: F.silu(g) * u)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    x = torch.randn(tokens, hidden, generator=gen)
    index = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(tokens)])
    index[0] = torch.tensor([4, 5])  # two members of one group (or of the one base) on a token
    weights = torch.rand(tokens, 2, generator=gen)
    counter = _SyncCounter()
    with torch.no_grad(), counter:
        out = mod(x, index, weights)
    torch.testing.assert_close(out, _slot_sum(mod, x, index, weights), rtol=1e-4, atol=1e-5)
    aligned = hidden % 4 == 0 and width % 4 == 0 and (rank == 0 or rank % 4 == 0)
    if path == "grouped" and (aligned or tokens * 2 <= 64):
        assert counter.count == 0


def test_the_cpu_walk_for_a_few_slots_has_the_grouped_paths_gradients(monkeypatch):
    """Recovery trains through whichever path a batch takes: both give the same weight and input gradients."""
    import moetrim.model.replaced as replaced_module

    gen = torch.Generator().manual_seed(5)
    mod = ReplacedExperts(8, 64, 32, KEPT, GROUPS, 4, lambda g, u: F.silu(g) * u)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    x0 = torch.randn(6, 64, generator=gen)
    index = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(6)])
    index[0] = torch.tensor([4, 5])
    weights = torch.rand(6, 2, generator=gen)
    grads = []
    for host_slots in (0, 1 << 30):
        monkeypatch.setattr(replaced_module, "_HOST_SLOTS", host_slots)
        mod.zero_grad()
        x = x0.clone().requires_grad_(True)
        mod(x, index, weights).pow(2).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in mod.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
