"""The training engine and its methods: bias updates, condensers, ESFT masks, DenseMixer, save/load."""

from __future__ import annotations

import copy

import pytest
import torch

import moetrim
from moetrim.assets.tiny import tiny_model, tiny_tokenizer
from moetrim.model.routing import RoutingSpec, choose_condensers, install_routing
from moetrim.model.view import find_moe_layers
from moetrim.train import FinetuneConfig, finetune
from moetrim.train.bias import BiasController
from moetrim.train.data import IGNORE, load_examples

from finetune_cases import records as _records

GAMMA = 0.01


def _run(model, method, tok=None, **kw):
    cfg = dict(method=method, lr=1e-3, max_steps=3, batch_size=4, seq_len=64, progress=False, logging_steps=1)
    cfg.update(kw)
    return finetune(model, tok or tiny_tokenizer(), _records(), FinetuneConfig(**cfg))


# -- data ----------------------------------------------------------------------------------------
def test_prompt_tokens_carry_no_loss():
    tok = tiny_tokenizer()
    ex = load_examples([{"prompt": "abc", "response": "de"}], tok, seq_len=64)[0]
    n_prompt = len(tok("abc")["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id  # the model learns to stop


def test_chat_records_train_assistant_turns_only():
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"},
            {"role": "assistant", "content": "zz"}]
    ex = load_examples([{"messages": msgs}], tok, seq_len=256)[0]
    learned = tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE])
    assert learned.replace("?", "").split() == ["yo", "zz"]  # assistant turns (and their line ends) only


@pytest.mark.parametrize("records, message", [
    ([], "no examples"),
    ([{"prompt": "a"}], "'response'"),
    ([{"prompt": "a", "response": "  "}], "empty"),
    ([{"foo": 1}], "needs 'prompt'"),
    ([{"messages": [{"role": "user", "content": "a"}]}], "no assistant turn"),
])
def test_bad_records_are_refused(records, message):
    with pytest.raises(moetrim.UsageError, match=message):
        load_examples(records, tiny_tokenizer(), seq_len=64)


# -- bias ----------------------------------------------------------------------------------------
def test_bias_moves_once_per_step_by_the_sign_of_summed_usage():
    model = tiny_model("qwen3_moe")
    patches = install_routing(model, RoutingSpec(bias=True))
    ctl = BiasController(patches, gamma=GAMMA, sign="sparsify")
    router = patches[0].router
    model.train()
    E = patches[0].layer.num_experts
    micro = [torch.randn(6, patches[0].layer.hidden_size) for _ in range(2)]  # two micro-batches of one step
    usage = torch.zeros(E)
    for h in micro:
        logits, _, _ = router(h)
        usage += logits.float().softmax(-1).sum(0).detach()
        assert not router.moetrim_bias.any()  # never during a forward
    ctl.step()
    want = GAMMA * torch.sign(usage - usage.mean())
    torch.testing.assert_close(router.moetrim_bias, want)
    ctl.sign = "balance"  # DeepSeek-V3: usage is the number of tokens that selected each expert
    h = micro[0]
    _, _, top_i = router(h)
    load = torch.bincount(top_i.reshape(-1), minlength=E).float()
    before = router.moetrim_bias.clone()
    ctl.step()
    torch.testing.assert_close(router.moetrim_bias - before, GAMMA * torch.sign(load.mean() - load))


@pytest.mark.parametrize("apply", ["logits", "selection"])
def test_balance_keeps_every_expert_in_use_on_a_renormalising_family(apply):
    """DeepSeek-V3's balancing counts the tokens each expert was selected for. Counted from the unbiased
    probabilities instead, `--bias-apply selection` pushed the same experts the same way every step
    and left several experts of a layer with no token at all after 300 steps."""
    model = tiny_model("qwen3_moe", norm_topk_prob=True)
    patches = install_routing(model, RoutingSpec(bias=True, bias_apply=apply))
    assert patches[0].normalise
    ctl = BiasController(patches, gamma=GAMMA, sign="balance")
    g = torch.Generator().manual_seed(3)
    H = patches[0].layer.hidden_size
    hidden = {p.layer.index: torch.randn(128, H, generator=g) + torch.randn(H, generator=g) for p in patches}
    model.train()
    for _ in range(300):
        for p in patches:
            p.router(hidden[p.layer.index])
        ctl.step()
    model.eval()
    with torch.no_grad():
        for p in patches:
            load = torch.bincount(p.router(hidden[p.layer.index])[2].reshape(-1), minlength=p.layer.num_experts)
            assert (load > 0).all(), (apply, p.layer.index, load.tolist())
            assert load.max() <= 2 * load.float().mean(), (apply, p.layer.index, load.tolist())


def test_bias_ignores_gradient_checkpoint_recompute():
    """A checkpointed layer replays its forward inside backward; that replay must not count as usage."""
    counts = {}
    for ckpt in (False, True):
        model = tiny_model("qwen3_moe")
        patches = install_routing(model, RoutingSpec(bias=True))
        ctl = BiasController(patches, gamma=GAMMA)
        model.train()
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        counts[ckpt] = [ctl.usage[p.layer.index].clone() for p in patches]
    for a, b in zip(counts[False], counts[True]):
        torch.testing.assert_close(a, b)


def test_trainer_updates_bias_once_per_optimizer_step_under_accumulation():
    model = tiny_model("qwen3_moe")
    res = _run(model, "auxfree", bias="sparsify", gamma=GAMMA, grad_accum=2, max_steps=3)
    assert res.report["bias_updates"] == 3
    for values in res.report["bias"].values():
        steps = torch.tensor(values) / GAMMA
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 3 + 1e-4
        assert steps.abs().max() > 0


# -- condensers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("budget, gate", [("additive", "prob"), ("fixed", "prob"), ("additive", "learned")])
def test_condenser_never_runs_twice(budget, gate):
    model = tiny_model("qwen3_moe")
    patches = install_routing(model, RoutingSpec(bias=True, condensers=1, budget=budget, gate=gate))
    for p in patches:
        p.router.moetrim_bias.copy_(torch.linspace(-1, 1, p.layer.num_experts))  # expert 0 has the lowest bias
        p.router.moetrim_bias[0] = 5.0  # ...not any more: the most favoured expert becomes lowest-id max
        p.router.moetrim_bias[3] = -9.0
    chosen = choose_condensers(model)
    assert all(v == [3] for v in chosen.values())
    router = patches[0].router
    k = router.top_k
    _, w, idx = router(torch.randn(50, patches[0].layer.hidden_size))
    routed = k if budget == "additive" else k - 1
    assert idx.shape[1] == routed + 1 and router.moetrim_routed_k == routed
    assert (idx[:, -1] == 3).all() and not (idx[:, :routed] == 3).any()
    assert all(len(set(row)) == len(row) for row in idx.tolist())
    if gate == "prob":
        assert torch.all(w > 0)


def test_phase2_keeps_moving_the_condensers_own_bias_as_the_authors_code_does():
    """ExpertCondenser's patches keep updating the whole bias vector in phase 2 (forced experts
    included, their probability in the usage): a condenser's bias, and so its `prob` gate weight,
    moves by gamma * sign(u - mean u) like any other expert's."""
    model = tiny_model("qwen3_moe")
    patches = install_routing(model, RoutingSpec(bias=True, condensers=2))
    for p in patches:
        p.router.moetrim_bias.copy_(torch.linspace(-0.05, 0.05, p.layer.num_experts))
    chosen = choose_condensers(model)
    ctl = BiasController(patches, gamma=GAMMA, sign="sparsify")
    router = patches[0].router
    model.train()
    h = torch.randn(40, patches[0].layer.hidden_size, generator=torch.Generator().manual_seed(2))
    before = router.moetrim_bias.clone()
    u = (router(h)[0].float() + before).softmax(-1).sum(0).detach()
    ctl.step()
    moved = router.moetrim_bias - before
    torch.testing.assert_close(moved, GAMMA * torch.sign(u - u.mean()))
    assert chosen[patches[0].layer.index] == [0, 1] and (moved[[0, 1]] != 0).all()


def test_condenser_run_switches_phase_and_reloads_identically(tmp_path):
    model = tiny_model("qwen3_moe")
    tok = tiny_tokenizer()
    res = _run(model, "condenser", tok=tok, max_steps=4, phase1=0.5, condensers=2, gamma=GAMMA, gamma_phase2=GAMMA / 10)
    rep = res.report
    assert rep["phase1_steps"] == 2 and rep["bias_updates"] == 4
    for layer, ids in rep["condensers"].items():
        bias = torch.tensor(rep["bias_at_switch"][layer])
        assert len(ids) == 2
        torch.testing.assert_close(torch.sort(bias[ids]).values, torch.sort(bias).values[:2])  # the two lowest biases
    moetrim.save(res.model, tmp_path / "out", tokenizer=tok)
    again = moetrim.load(tmp_path / "out")
    ids = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        assert torch.equal(res.model(input_ids=ids).logits, again(input_ids=ids).logits)
    from helpers import auto_equals_moetrim_load, plain_transformers_error

    assert "moetrim_routed" in plain_transformers_error(tmp_path / "out")
    assert auto_equals_moetrim_load(tmp_path / "out", ids)


def test_routers_that_are_not_softmax_topk_are_refused():
    with pytest.raises(moetrim.UsageError, match="softmax"):
        install_routing(tiny_model("deepseek_v3"), RoutingSpec(bias=True))


def test_too_many_condensers_are_refused():
    with pytest.raises(moetrim.UsageError, match="fewer than the 8 experts"):
        _run(tiny_model("qwen3_moe"), "condenser", condensers=8)


# -- ESFT ----------------------------------------------------------------------------------------
def test_esft_frozen_experts_stay_bit_identical_under_adamw_decay():
    model = tiny_model("qwen3_moe")
    before = copy.deepcopy(model.state_dict())
    res = _run(model, "esft", esft_threshold=0.3, weight_decay=0.1, max_steps=4)
    chosen = {int(k): v for k, v in res.report["esft"]["experts"].items()}
    after = res.model.state_dict()
    layers = {l.index: l for l in find_moe_layers(res.model)}
    prefix = {i: l.prefix for i, l in layers.items()}
    moved_any = False
    for name, t in after.items():
        owner = next((i for i, p in prefix.items() if name.startswith(p + ".experts.")), None)
        if owner is None:
            assert torch.equal(t, before[name]), f"{name} is frozen but changed"
            continue
        for e in range(t.shape[0]):
            same = torch.equal(t[e], before[name][e])
            if e in chosen[owner]:
                moved_any |= not same
            else:
                assert same, f"{name}[{e}] is a frozen expert but changed"
    assert moved_any
    assert all(len(v) < layers[i].num_experts for i, v in chosen.items())
    # the report counts the selected experts' parameters, not the whole fused tensors they sit in
    per_expert = {i: l.experts.gate_up_proj[0].numel() + l.experts.down_proj[0].numel() for i, l in layers.items()}
    assert res.report["trainable_parameters"] == sum(len(v) * per_expert[i] for i, v in chosen.items())


def test_esft_selection_reaches_the_threshold_per_layer():
    from moetrim.train.esft import select_experts

    rel = {0: torch.tensor([0.5, 0.3, 0.15, 0.05]), 1: torch.tensor([0.25, 0.25, 0.25, 0.25])}
    assert select_experts(rel, 0.6) == {0: [0, 1], 1: [0, 1, 2]}
    assert select_experts(rel, 0.5) == {0: [0], 1: [0, 1]}


# -- DenseMixer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family, overrides", [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": True}), ("mixtral", {})])
def test_densemixer_forward_is_sparse_and_router_gets_the_dense_gradient(family, overrides):
    """The router's gradient is that of sum_e w_e E_e(x) over ALL experts (experts held fixed), w the
    weights the sparse pass would give: p, or on a renormalising family p / n with n the top-k sum
    (stop-gradient on n outside the top-k), as in yaof20/DenseMixer."""
    from moetrim.train.densemixer import DenseMixer

    torch.manual_seed(0)
    model = tiny_model(family, **overrides)
    layer = find_moe_layers(model)[0]
    model.train()
    x = torch.randn(1, 10, layer.hidden_size)
    v = torch.randn(1, 10, layer.hidden_size)
    sparse = layer.block(x)
    sparse = sparse[0] if isinstance(sparse, tuple) else sparse
    mixer = DenseMixer([layer])
    assert mixer.normalise[layer.index] == (family == "mixtral" or bool(overrides))
    try:
        y = layer.block(x)
        y = y[0] if isinstance(y, tuple) else y
        torch.testing.assert_close(y, sparse, rtol=0, atol=1e-6)
        layer.router_weight.grad = None
        (y * v).sum().backward()
        got = layer.router_weight.grad.clone()
    finally:
        mixer.remove()
    # by hand
    layer.router_weight.grad = None
    h = x.reshape(-1, layer.hidden_size)
    p = torch.nn.functional.linear(h, layer.router_weight).float().softmax(-1)
    w = p
    if mixer.normalise[layer.index]:
        top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, p.topk(layer.top_k, dim=-1).indices, True)
        n = p.masked_fill(~top, 0).sum(-1, keepdim=True)
        w = torch.where(top, p / n, p / n.detach())
    with torch.no_grad():
        outs = torch.stack([layer.experts(h, torch.full((10, 1), e), torch.ones(10, 1)) for e in range(layer.num_experts)], 1)
    dense = torch.einsum("te,teh->th", w, outs)
    (dense * v.reshape(-1, layer.hidden_size)).sum().backward()
    torch.testing.assert_close(got, layer.router_weight.grad, rtol=1e-4, atol=1e-6)


def test_densemixer_refuses_routers_that_are_not_softmax_topk():
    from moetrim.train.densemixer import DenseMixer

    with pytest.raises(moetrim.UsageError, match="densemixer.*softmax then top-k"):
        DenseMixer(find_moe_layers(tiny_model("deepseek_v3")))


# -- the engine ----------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["moetrim", "peft"])
def test_lora_trains_adapters_and_merges_into_a_standard_model(tmp_path, impl):
    pytest.importorskip("peft")
    model = tiny_model("qwen3_moe")
    before = copy.deepcopy(model.state_dict())
    res = _run(model, "full", lora=4, lr=1e-2, lora_experts=impl)
    assert res.report["trainable_parameters"] < sum(t.numel() for t in before.values()) / 4
    after = res.model.state_dict()
    assert set(after) == set(before)  # merged: the original tensor names, no adapters left
    changed = [n for n in after if not torch.equal(after[n], before[n])]
    assert any("experts" in n for n in changed) and any("q_proj" in n for n in changed)
    assert type(res.model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"  # the stock module is back


@pytest.mark.parametrize("resume_from", [1, 2])
def test_resume_before_or_after_the_condenser_switch_gives_the_same_model(tmp_path, resume_from):
    """The switch (after step 2 here) breaks bias ties by the usage summed since step 1: a run resumed
    from checkpoint-1 must have that sum from the checkpoint, or it picks other condensers."""
    import shutil

    tok = tiny_tokenizer()
    kw = dict(tok=tok, max_steps=3, phase1=0.67, condensers=2, gamma=GAMMA, checkpoint_every=1)
    full = _run(tiny_model("qwen3_moe", seed=1), "condenser", checkpoint_dir=str(tmp_path / "a"), **kw)
    assert full.report["phase1_steps"] == 2
    for step in range(resume_from + 1, 4):
        shutil.rmtree(tmp_path / "a" / f"checkpoint-{step}")
    again = _run(tiny_model("qwen3_moe", seed=5), "condenser", checkpoint_dir=str(tmp_path / "a"), resume=True, **kw)
    for key in ("condensers", "bias", "bias_at_switch", "bias_updates"):
        assert again.report[key] == full.report[key], key
    a, b = full.model.state_dict(), again.model.state_dict()
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


def test_non_moe_model_is_a_usage_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(moetrim.UsageError, match="no MoE layers"):
        _run(model, "full")


def test_moetrim_expert_lora_folds_back_exactly():
    """The corrections computed for routed tokens equal, once folded into the stock tensors, W + BA."""
    from moetrim.train.expert_lora import ExpertLoRA

    model = tiny_model("qwen3_moe")
    lora = ExpertLoRA(find_moe_layers(model), rank=3, seed=1)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.05)
    ids = torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with_adapters = model(input_ids=ids).logits
        lora.merge()
        merged = model(input_ids=ids).logits
    assert type(find_moe_layers(model)[0].experts).__name__ == "Qwen3MoeExperts"
    torch.testing.assert_close(merged, with_adapters, rtol=1e-4, atol=1e-5)
    assert not torch.equal(merged, tiny_model("qwen3_moe")(input_ids=ids).logits)
