"""Training without waste: expert LoRA on the stock tensors (no copy), DenseMixer's dense pass batched,
and no per-layer host reads in ESFT, the bias update and the router hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moetrim.assets.tiny import tiny_model
from moetrim.model.view import find_moe_layers


def _copying_lora(model, rank: int, seed: int):
    """The earlier expert LoRA: every expert copied into a ReplacedExperts group of one, factors zero-started."""
    from moetrim.apply.replace import build_replaced

    swapped, factors = [], []
    for layer in find_moe_layers(model):
        new = build_replaced(layer, [], [[e] for e in range(layer.num_experts)], rank, init="zero", seed=seed)
        for name, p in new.named_parameters():
            p.requires_grad_(name in ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"))
        name = next(c for c, m in layer.block.named_children() if m is layer.experts)
        setattr(layer.block, name, new)
        swapped.append((layer, name, new))
        factors += [getattr(new, n) for n in ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")]
    return swapped, factors


def _merge_copying(swapped) -> None:
    from moetrim.model.view import stock_expert_weights

    with torch.no_grad():
        for layer, name, new in swapped:
            for e in range(new.num_experts):
                w = stock_expert_weights(layer.experts, e)
                w.gate.add_(new.gate_b[e] @ new.gate_a[e])
                w.up.add_(new.up_b[e] @ new.up_a[e])
                w.down.add_(new.down_b[e] @ new.down_a[e])
            setattr(layer.block, name, layer.experts)


@pytest.mark.parametrize("family, rank", [("qwen3_moe", 3), ("qwen3_moe", 4), ("mixtral", 4), ("olmoe", 8)])
def test_expert_lora_matches_the_copying_version_without_a_copy(family, rank):
    """Same factors from the same seed, same outputs and factor gradients, same merged weights; and the
    experts' tensors are the model's own (no second copy)."""
    from moetrim.train.expert_lora import ExpertLoRA

    old_model, new_model = tiny_model(family), tiny_model(family)
    before = sum(p.numel() for p in new_model.parameters())
    storage = [l.experts.gate_up_proj.data_ptr() for l in find_moe_layers(new_model)]
    swapped, old_factors = _copying_lora(old_model, rank, seed=3)
    lora = ExpertLoRA(find_moe_layers(new_model), rank, seed=3)
    new_factors = lora.parameters()
    for a, b in zip(old_factors, new_factors, strict=True):
        assert torch.equal(a, b)
    assert [l.experts.gate_up_proj.data_ptr() for l in find_moe_layers(new_model)] == storage
    assert sum(p.numel() for p in new_model.parameters()) == before + sum(p.numel() for p in new_factors)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a, b in zip(old_factors, new_factors):
            v = torch.randn(a.shape, generator=gen) * 0.05
            a.copy_(v)
            b.copy_(v)
    ids = torch.randint(0, 120, (2, 12), generator=gen)
    old_model.train()
    new_model.train()
    old_out, new_out = old_model(input_ids=ids, labels=ids), new_model(input_ids=ids, labels=ids)
    torch.testing.assert_close(new_out.logits, old_out.logits, rtol=1e-5, atol=1e-5)
    old_out.loss.backward()
    new_out.loss.backward()
    for a, b in zip(old_factors, new_factors):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7)
    _merge_copying(swapped)
    lora.merge()
    old_state, new_state = old_model.state_dict(), new_model.state_dict()
    assert set(new_state) == set(old_state)
    for name in old_state:
        assert torch.equal(new_state[name], old_state[name]), name


def test_expert_lora_grouped_and_per_expert_products_agree(monkeypatch):
    """The grouped GEMMs and the per-expert loop that stands in where the kernel refuses compute the same."""
    import moetrim.train.fused as fused
    from moetrim.train.expert_lora import ExpertLoRA

    model = tiny_model("qwen3_moe")
    lora = ExpertLoRA(find_moe_layers(model), 8, seed=0)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.05)
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    runs = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(fused, "_grouped_ok", lambda x, w: False)
        for p in lora.parameters():
            p.grad = None
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        runs.append((out.logits.detach(), [p.grad.clone() for p in lora.parameters()]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _loop_densemixer_grads(model, ids):
    """Router gradients with the dense pass computed the earlier way: the experts module once per expert."""
    import moetrim.train.densemixer as dm

    def loop(experts, hidden, num_experts):
        t = hidden.shape[0]
        one = torch.ones(t, 1, dtype=hidden.dtype, device=hidden.device)
        return torch.stack([experts.forward(hidden, torch.full((t, 1), e), one) for e in range(num_experts)])

    saved = getattr(dm, "all_experts", None)  # (the earlier module looped itself)
    dm.all_experts = loop
    try:
        return _densemixer_grads(model, ids)
    finally:
        dm.all_experts = saved


def _densemixer_grads(model, ids):
    from moetrim.train.densemixer import DenseMixer

    model.zero_grad(set_to_none=True)
    mixer = DenseMixer(find_moe_layers(model))
    try:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    finally:
        mixer.remove()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, overrides, lora", [
    ("qwen3_moe", {"norm_topk_prob": True}, 0), ("qwen3_moe", {"norm_topk_prob": False}, 0), ("qwen2_moe", {}, 0),
    ("mixtral", {}, 0), ("qwen3_moe", {"norm_topk_prob": True}, 4),
])
def test_densemixer_dense_pass_is_one_batched_computation_with_the_same_gradients(monkeypatch, family, overrides, lora):
    """Outputs and every gradient equal the per-expert loop's (renormalising and not, with expert LoRA),
    and the experts module's forward runs once per layer (the sparse pass), not once per expert."""
    from moetrim.train.expert_lora import ExpertLoRA

    model = tiny_model(family, **overrides)
    if lora:
        factors = ExpertLoRA(find_moe_layers(model), lora, seed=0).parameters()
        with torch.no_grad():
            for p in factors:
                p.normal_(0, 0.05).requires_grad_(True)
    model.train()
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    want_logits, want = _loop_densemixer_grads(model, ids)
    layers = find_moe_layers(model)
    calls = []
    for layer in layers:
        forward = layer.experts.forward
        monkeypatch.setattr(layer.experts, "forward", lambda *a, f=forward: calls.append(1) or f(*a))
    got_logits, got = _densemixer_grads(model, ids)
    assert len(calls) == len(layers)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-6)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


class _SyncCounter(TorchDispatchMode):
    """Counts operators that read a tensor's values back to the host or size their output by its values."""

    READS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "_unique2", "unique_consecutive", "unique_dim")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        masked = name in ("index", "index_put_", "index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in self.READS or masked:  # a boolean mask index finds its nonzero entries: a read on CUDA
            self.count += 1
        return func(*args, **(kwargs or {}))


def _reads_per_step(layers: int, method: str) -> int:
    """Host reads over two training steps of a tiny model with `layers` MoE layers (forward, backward and
    the method's per-step work), tolist/cpu calls included."""
    from moetrim.model.routing import RoutingSpec, install_routing
    from moetrim.train.bias import BiasController
    from moetrim.train.esft import ExpertMask

    model = tiny_model("qwen3_moe", num_hidden_layers=layers)
    moe = find_moe_layers(model)
    step = None
    if method == "bias":
        ctl = BiasController(install_routing(model, RoutingSpec(bias=True)), gamma=0.01)
        step = ctl.step
    else:
        mask = ExpertMask(model, moe, {l.index: [0, 1, 3] for l in moe})
        step = lambda: mask.decay(1e-3, 0.1)  # noqa: E731
    model.train()
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    counter = _SyncCounter()
    counted = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "item")}

    def spy(name):
        def call(self, *a, **k):
            counted["n"] += 1
            return originals[name](self, *a, **k)
        return call

    try:
        for name in originals:
            setattr(torch.Tensor, name, spy(name))
        with counter:
            for _ in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
                step()
                model.zero_grad(set_to_none=True)
    finally:
        for name, f in originals.items():
            setattr(torch.Tensor, name, f)
    return counter.count + counted["n"]


@pytest.mark.parametrize("method", ["bias", "esft"])
def test_no_host_reads_per_layer_in_a_training_step(method):
    """The bias update (and the router hook that observes routing for it) and ESFT's masks read nothing
    back per layer: the count of host reads in two steps does not grow with the number of layers."""
    assert _reads_per_step(2, method) == _reads_per_step(4, method)
