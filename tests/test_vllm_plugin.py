"""The vLLM plugin's pure parts, without vLLM: weight unpacking against the checkpoint and the dense model,
width grouping and padding, the grouped path's gather -> per-group top-1 -> scatter-add computation against
moetrim's own VariableWidthExperts, the config it builds, and its errors. (Serving itself: benchmarks/serve.py.)"""

from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import moetrim
from moetrim.integrations.vllm_plugin import FAMILIES, UnsupportedFamily, family, register
from moetrim.integrations.vllm_plugin.config import MoetrimVarwidthConfig
from moetrim.integrations.vllm_plugin.unpack import (
    ExpertNames, LayerLayout, LayoutError, group_plan, grouped_forward, per_expert_tensors, read_layouts,
    served_widths, stack_group, unpack_down, unpack_gate_up, width_groups,
)
from moetrim.assets.tiny import tiny_model, tiny_tokenizer
from moetrim.model.varwidth import VariableWidthExperts
from moetrim.model.view import find_moe_layers
from moetrim.plan import make_plan


def _saved(tmp_path, allocation: str, seed: int = 1):
    """A tiny Qwen2-MoE, its dense copy, the plan, and the saved variable-width checkpoint."""
    dense = tiny_model("qwen2_moe")
    m = copy.deepcopy(dense)
    plan = make_plan(m, None, criterion="random", ratio=0.5, allocation=allocation, seed=seed)
    moetrim.apply_plan(m, plan, force_varwidth=True)
    out = moetrim.save(m, tmp_path / allocation, tokenizer=tiny_tokenizer(), plan=plan)
    with safe_open(str(out / "model.safetensors"), framework="pt") as sf:
        state = {k: sf.get_tensor(k) for k in sf.keys()}
    return dense, plan, json.loads((out / "config.json").read_text()), state


@pytest.mark.parametrize("allocation", ["global", "layer_width"])
def test_unpacked_experts_are_the_dense_experts_kept_dims(tmp_path, allocation):
    """Every unpacked expert equals the dense expert's kept rows/columns, taken straight from the plan."""
    dense, plan, config, state = _saved(tmp_path, allocation)
    layouts = read_layouts(config)
    dense_layers = {l.index: l for l in find_moe_layers(dense)}
    assert sorted(layouts) == sorted(dense_layers)
    if allocation == "global":
        assert any(lay.uniform_width is None for lay in layouts.values())  # the test exercises mixed widths
    for p in plan.layers:
        lay, pre = layouts[p.layer], f"model.layers.{p.layer}.mlp.experts."
        gu = unpack_gate_up(state[pre + "gate_up"], lay)
        down = unpack_down(state[pre + "down_blocks"], lay, 64)
        assert len(gu) == len(p.kept_experts) == lay.num_experts
        for e, (src, dims) in enumerate(zip(p.kept_experts, p.kept_dims)):
            ref = dense_layers[p.layer].expert(src)
            keep = torch.tensor(dims)
            assert torch.equal(gu[e][0], ref.gate[keep]) and torch.equal(gu[e][1], ref.up[keep])
            assert torch.equal(down[e], ref.down[:, keep])


def test_by_expert_layout_unpacks_like_moetrims_module():
    """Version-1 checkpoints store blocks in expert order; the unpacker follows the record's layout."""
    torch.manual_seed(0)
    widths = [24, 8, 16, 8]
    for layout in ("by_width", "by_expert"):
        mod = VariableWidthExperts(widths, 32, lambda g, u: F.silu(g) * u, layout=layout)
        torch.nn.init.normal_(mod.gate_up)
        torch.nn.init.normal_(mod.down_blocks)
        lay = LayerLayout(tuple(widths), 2, layout)
        gu, down = unpack_gate_up(mod.gate_up.detach(), lay), unpack_down(mod.down_blocks.detach(), lay, 32)
        for e in range(len(widths)):
            w = mod.expert_weights(e)
            assert torch.equal(gu[e][0], w.gate) and torch.equal(gu[e][1], w.up) and torch.equal(down[e], w.down)
    assert LayerLayout((8, 24, 16), 1).expert_of_block() == [1, 2, 0]


def test_per_expert_tensors_names_shapes_and_padding(tmp_path):
    """Packed tensors become the engine's per-expert names; padding appends exact zeros; the rest passes."""
    _, _, config, state = _saved(tmp_path, "global")
    layouts = read_layouts(config)
    widths, padded = served_widths(layouts)
    assert padded == sorted(layouts) and all(widths[i] == max(layouts[i].widths) for i in layouts)
    out = dict(per_expert_tensors(state.items(), layouts, ExpertNames(), 64, pad_to={i: widths[i] for i in padded}))
    assert not any(k.endswith(("gate_up", "down_blocks")) for k in out)
    for i, lay in layouts.items():
        gu = unpack_gate_up(state[f"model.layers.{i}.mlp.experts.gate_up"], lay)
        for e, w in enumerate(lay.widths):
            gate = out[f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight"]
            down = out[f"model.layers.{i}.mlp.experts.{e}.down_proj.weight"]
            assert gate.shape == (widths[i], 64) and down.shape == (64, widths[i])
            assert torch.equal(gate[:w], gu[e][0]) and not gate[w:].any() and not down[:, w:].any()
    assert torch.equal(out["model.layers.0.mlp.gate.weight"], state["model.layers.0.mlp.gate.weight"])
    mixtral = dict(per_expert_tensors(state.items(), layouts, FAMILIES["mixtral"].names, 64, rename=dict(FAMILIES["mixtral"].rename)))
    assert "model.layers.0.block_sparse_moe.gate.weight" in mixtral
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in mixtral  # up
    assert torch.equal(mixtral["model.layers.0.block_sparse_moe.experts.3.w3.weight"],
                       out["model.layers.0.mlp.experts.3.up_proj.weight"][:layouts[0].widths[3]])


def test_width_groups_pad_exactly():
    """Experts grouped by padded width compute what each computes alone (zero padding is exact)."""
    groups = width_groups([40, 64, 33, 100, 7], align=32)
    assert [(g.width, g.experts) for g in groups] == [(128, (3,)), (64, (0, 1, 2)), (32, (4,))]
    assert [g.width for g in width_groups([5, 5, 3])] == [5, 3]
    torch.manual_seed(0)
    lay = LayerLayout((40, 64, 33), 2)
    gate_up, down_blocks = torch.randn(2 * lay.total, 16), torch.randn(16 * lay.total)
    (g,) = width_groups(lay.widths, align=32)
    w13, w2 = stack_group(gate_up, down_blocks, lay, g, 16)
    assert w13.shape == (3, 128, 16) and w2.shape == (3, 16, 64)
    x = torch.randn(5, 16)
    gu, down = unpack_gate_up(gate_up, lay), unpack_down(down_blocks, lay, 16)
    for e in range(3):
        alone = (F.silu(x @ gu[e][0].T) * (x @ gu[e][1].T)) @ down[e].T
        gate, up = w13[e].chunk(2)
        grouped = (F.silu(x @ gate.T) * (x @ up.T)) @ w2[e].T
        torch.testing.assert_close(grouped, alone, rtol=0, atol=1e-5)


def test_group_plan_assigns_groups_local_ids_and_weights():
    """Each expert lands in the group of its (rounded) width at a fixed local id, and that group's stacked
    tensors hold exactly its weights at that id."""
    lay = LayerLayout((48, 16, 48, 32, 16, 48), 2)
    plan = group_plan(lay)
    assert [(g.width, g.experts) for g in plan.groups] == [(48, (0, 2, 5)), (32, (3,)), (16, (1, 4))]
    assert plan.group_of == (0, 2, 0, 1, 2, 0) and plan.local_of == (0, 0, 1, 0, 1, 2)
    assert plan.served_params(10) == 3 * 10 * lay.total  # exact widths: nothing padded
    rounded = group_plan(lay, align=32)
    assert [(g.width, g.experts) for g in rounded.groups] == [(64, (0, 2, 5)), (32, (1, 3, 4))]
    assert rounded.group_of == (0, 1, 0, 1, 1, 0) and rounded.local_of == (0, 0, 1, 1, 2, 2)
    torch.manual_seed(0)
    gate_up, down_blocks = torch.randn(2 * lay.total, 10), torch.randn(10 * lay.total)
    gu, down = unpack_gate_up(gate_up, lay), unpack_down(down_blocks, lay, 10)
    for p in (plan, rounded):
        stacked = [stack_group(gate_up, down_blocks, lay, g, 10) for g in p.groups]
        for e, w in enumerate(lay.widths):
            w13, w2 = stacked[p.group_of[e]]
            j, width = p.local_of[e], p.groups[p.group_of[e]].width
            assert torch.equal(w13[j, :w], gu[e][0]) and torch.equal(w13[j, width:width + w], gu[e][1])
            assert torch.equal(w2[j, :, :w], down[e]) and not w13[j, w:width].any() and not w2[j, :, w:].any()


def _top1_runner(groups: list[tuple[torch.Tensor, torch.Tensor]], calls: list):
    """What a fused-MoE kernel of one group computes with top_k = 1: w * down(silu(gate x) * up x)."""
    def run(g, rows, weights, ids):
        calls.append((g, rows.shape[0], ids.dtype))
        w13, w2 = groups[g]
        gate, up = w13[ids[:, 0]].chunk(2, dim=1)  # [S, W, H] each
        h = F.silu(torch.einsum("sh,swh->sw", rows, gate)) * torch.einsum("sh,swh->sw", rows, up)
        return weights * torch.einsum("sw,shw->sh", h, w2[ids[:, 0]])
    return run


@pytest.mark.parametrize("path", ["counted", "fixed"])
@pytest.mark.parametrize("align", [1, 32])
def test_grouped_forward_equals_variable_width_experts(align, path, monkeypatch):
    """Route once, gather each group's slots, run the group top-1 with local ids, scatter-add: the output is
    moetrim's own VariableWidthExperts output on the same tokens, routing and weights. Large batches count
    each group's slots (every slot computed once); small ones (every batch a CUDA graph captures) give each
    group every slot row, the others at weight 0, so no count is read back to the host."""
    monkeypatch.setenv("MOETRIM_VLLM_SYNC_FREE_TOKENS", "0" if path == "counted" else "4096")
    torch.manual_seed(0)
    widths, hidden, k, tokens = [40, 8, 24, 40, 8, 16, 24, 40], 32, 3, 37
    mod = VariableWidthExperts(widths, hidden, lambda g, u: F.silu(g) * u)
    torch.nn.init.normal_(mod.gate_up, std=0.3)
    torch.nn.init.normal_(mod.down_blocks, std=0.3)
    lay = LayerLayout(tuple(widths), k)
    x = torch.randn(tokens, hidden)
    probs = torch.softmax(torch.randn(tokens, len(widths)), dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    ids = ids.to(torch.int32)  # vLLM's routers hand int32 ids
    with torch.no_grad():
        want = mod(x, ids.long(), weights)
    plan = group_plan(lay, align)
    groups = [stack_group(mod.gate_up.detach(), mod.down_blocks.detach(), lay, g, hidden) for g in plan.groups]
    group_of, local_of = torch.tensor(plan.group_of), torch.tensor(plan.local_of)
    calls: list = []
    got = grouped_forward(x, weights, ids, group_of, local_of, len(plan.groups), _top1_runner(groups, calls))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if path == "counted":
        assert sum(n for _, n, _ in calls) == tokens * k  # every routed slot computed once, no more
    else:
        assert [(g, n) for g, n, _ in calls] == [(g, tokens * k) for g in range(len(plan.groups))]  # shapes fixed by T
    assert all(dt == torch.int32 for _, _, dt in calls) and len({g for g, _, _ in calls}) == len(plan.groups)
    # the check can fail: local ids off by one inside each group give another output
    wrong = torch.tensor([(j + 1) % len(plan.groups[g].experts) for g, j in zip(plan.group_of, plan.local_of)])
    bad = grouped_forward(x, weights, ids, group_of, wrong, len(plan.groups), _top1_runner(groups, []))
    assert not torch.allclose(bad, want, atol=1e-3)


def test_grouped_forward_skips_empty_groups_and_single_token(monkeypatch):
    monkeypatch.setenv("MOETRIM_VLLM_SYNC_FREE_TOKENS", "0")  # the counted path
    torch.manual_seed(1)
    widths, hidden = [16, 8, 8, 4], 8
    mod = VariableWidthExperts(widths, hidden, lambda g, u: F.silu(g) * u)
    torch.nn.init.normal_(mod.gate_up)
    torch.nn.init.normal_(mod.down_blocks)
    lay = LayerLayout(tuple(widths), 2)
    plan = group_plan(lay)
    groups = [stack_group(mod.gate_up.detach(), mod.down_blocks.detach(), lay, g, hidden) for g in plan.groups]
    x, ids, weights = torch.randn(1, hidden), torch.tensor([[2, 1]], dtype=torch.int32), torch.tensor([[0.7, 0.3]])
    calls: list = []
    got = grouped_forward(x, weights, ids, torch.tensor(plan.group_of), torch.tensor(plan.local_of), len(plan.groups),
                          _top1_runner(groups, calls))
    assert [(g, n) for g, n, _ in calls] == [(1, 2)]  # both slots in the width-8 group, one call, others skipped
    with torch.no_grad():
        torch.testing.assert_close(got, mod(x, ids.long(), weights), rtol=1e-5, atol=1e-5)


def test_small_batches_compile_to_one_graph_with_no_host_read(monkeypatch):
    """The fixed path compiles with fullgraph=True (a graph break or a host read would raise), and the
    compiled step equals moetrim's own module."""
    monkeypatch.delenv("MOETRIM_VLLM_SYNC_FREE_TOKENS", raising=False)  # the default: 5 tokens take the fixed path
    torch.manual_seed(2)
    widths, hidden, k = [16, 8, 8, 4, 16, 8], 8, 2
    mod = VariableWidthExperts(widths, hidden, lambda g, u: F.silu(g) * u)
    torch.nn.init.normal_(mod.gate_up)
    torch.nn.init.normal_(mod.down_blocks)
    lay = LayerLayout(tuple(widths), k)
    plan = group_plan(lay)
    groups = [stack_group(mod.gate_up.detach(), mod.down_blocks.detach(), lay, g, hidden) for g in plan.groups]
    group_of, local_of = torch.tensor(plan.group_of), torch.tensor(plan.local_of)
    x = torch.randn(5, hidden)
    weights, ids = torch.softmax(torch.randn(5, len(widths)), -1).topk(k, dim=-1)
    ids = ids.to(torch.int32)
    run = _top1_runner(groups, [])

    def step(x, weights, ids):
        return grouped_forward(x, weights, ids, group_of, local_of, len(plan.groups), run)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(x, weights, ids)
    with torch.no_grad():
        torch.testing.assert_close(got, mod(x, ids.long(), weights), rtol=1e-5, atol=1e-5)


def test_bad_records_and_tensors_are_refused():
    with pytest.raises(LayoutError, match="no 'moetrim_varwidth'"):
        read_layouts({"model_type": "qwen2_moe"})
    with pytest.raises(LayoutError, match="layer '0'"):
        read_layouts({"moetrim_varwidth": {"layers": {"0": {"widths": [8, 0], "top_k": 1, "num_experts": 2}}}})
    with pytest.raises(LayoutError, match="top_k"):
        read_layouts({"moetrim_varwidth": {"layers": {"0": {"widths": [8], "top_k": 2, "num_experts": 1}}}})
    with pytest.raises(LayoutError, match="unknown variable-width layout"):
        read_layouts({"moetrim_varwidth": {"layout": "by_color", "layers": {"0": {"widths": [8], "top_k": 1}}}})
    with pytest.raises(LayoutError, match=r"need \[48, H\]"):
        unpack_gate_up(torch.zeros(40, 4), LayerLayout((8, 16), 1))


def test_config_becomes_the_family_config_naming_the_plugin_model(tmp_path):
    _, _, config, _ = _saved(tmp_path, "layer_width")
    cfg = MoetrimVarwidthConfig.from_dict(config)
    assert cfg.model_type == "qwen2_moe" and isinstance(cfg, type(tiny_model("qwen2_moe").config))
    assert cfg.architectures == ["MoetrimVarwidthQwen2MoeForCausalLM"]
    assert read_layouts(cfg) == read_layouts(config)
    again = pickle.loads(pickle.dumps(cfg))  # vLLM hands configs between processes
    assert type(again) is type(cfg) and again.moe_intermediate_size == cfg.moe_intermediate_size


def test_unsupported_family_is_one_clear_line(tmp_path):
    _, _, config, _ = _saved(tmp_path, "layer_width")
    config["moetrim_base_model_type"] = "gpt_oss"
    with pytest.raises(UnsupportedFamily) as err:
        MoetrimVarwidthConfig.from_dict(config)
    msg = str(err.value)
    assert "\n" not in msg and "'gpt_oss'" in msg and "qwen2_moe" in msg and "mixtral" in msg
    with pytest.raises(UnsupportedFamily):
        family(None)
    assert family("olmoe").plugin_architecture == "MoetrimVarwidthOlmoeForCausalLM"


def test_register_without_vllm_warns_once_and_does_not_raise(caplog):
    pytest.importorskip("moetrim")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here; register() would really register")
    except ImportError:
        pass
    with caplog.at_level(logging.WARNING, logger="moetrim.vllm"):
        register()
    lines = [r for r in caplog.records if r.name == "moetrim.vllm"]
    assert len(lines) == 1 and "not registered" in lines[0].getMessage()


def _saved_replaced(tmp_path, family_name: str = "qwen3_moe"):
    """A tiny model with experts replaced in every MoE layer (a kept set, two groups, rank 4), saved by moetrim."""
    from moetrim.apply.replace import build_replaced
    from moetrim.model.replaced import install_layer

    m = tiny_model(family_name)
    for layer in find_moe_layers(m):
        install_layer(m, layer, build_replaced(layer, [0, 2, 3, 5], [[1, 4], [6, 7]], 4, init="zero", seed=0))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("_a", "_b")):  # non-zero corrections, so base + B A differs from the base
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out = moetrim.save(m, tmp_path / "replaced", tokenizer=tiny_tokenizer())
    with safe_open(str(out / "model.safetensors"), framework="pt") as sf:
        state = {k: sf.get_tensor(k) for k in sf.keys()}
    return m, json.loads((out / "config.json").read_text()), state


def test_replaced_checkpoint_becomes_the_stock_experts_it_computes(tmp_path):
    """The labelled fallback: every expert of a replaced checkpoint streams out as stock per-expert tensors
    equal to the module's effective weights (base + B A for a replaced one); other tensors pass unchanged;
    vLLM's config is the family's, naming the plugin's model, and survives pickling."""
    from moetrim.integrations.vllm_plugin.config import MoetrimReplacedConfig
    from moetrim.integrations.vllm_plugin.replaced import per_expert_replaced, replaced_records

    model, config, state = _saved_replaced(tmp_path)
    records = replaced_records(config)
    layers = {l.index: l for l in find_moe_layers(model)}
    assert sorted(records) == sorted(layers)
    names = family("qwen3_moe").names
    out = dict(per_expert_replaced(state.items(), records, names))
    for i, layer in layers.items():
        for e in range(8):
            want = layer.experts.expert_weights(e)
            for proj, w in ((names.gate, want.gate), (names.up, want.up), (names.down, want.down)):
                torch.testing.assert_close(out[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"], w.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(out["model.layers.0.mlp.experts.1.gate_proj.weight"], state["model.layers.0.mlp.experts.base_gate_up"][0][:records[0]["width"]])
    passed = {k for k in state if ".experts." not in k}
    assert passed <= set(out) and all(torch.equal(out[k], state[k]) for k in passed)
    cfg = MoetrimReplacedConfig.from_dict(config)
    assert cfg.model_type == "qwen3_moe" and cfg.architectures == ["MoetrimVarwidthQwen3MoeForCausalLM"]
    assert replaced_records(pickle.loads(pickle.dumps(cfg))) == records
    # the check can fail: a missing factor stops the stream in one line naming the layer and the tensor
    broken = {k: v for k, v in state.items() if k != "model.layers.1.mlp.experts.up_b"}
    with pytest.raises(LayoutError, match=r"1: \['up_b'\]"):
        list(per_expert_replaced(broken.items(), records, names))


def test_novice_checkpoint_is_refused_in_one_line_where_reconstructed():
    """A novice (MoNE) outputs a constant vector: no stock expert computes it, so the reconstruction refuses a
    layer with novices in one line naming it, rather than serving a wrong model (the native path serves it)."""
    from moetrim.integrations.vllm_plugin.replaced import check_reconstructible, per_expert_replaced, replaced_records

    spec = {"num_experts": 8, "width": 32, "kept": [0, 2, 3, 4, 5, 6, 7], "groups": [], "rank": 0}
    config = {"moetrim_replaced": {"version": 1, "layers": {"0": spec, "1": {**spec, "kept": [0, 2, 4, 5, 6, 7], "novices": [1, 3]}}}}
    records = replaced_records(config)
    assert records[1]["novices"] == [1, 3]
    with pytest.raises(LayoutError) as err:
        check_reconstructible(records)
    assert "\n" not in str(err.value) and "layer 1" in str(err.value) and "novice" in str(err.value)
    with pytest.raises(LayoutError, match="layer 1"):
        list(per_expert_replaced([], records, ExpertNames()))
    check_reconstructible({0: records[0]})
