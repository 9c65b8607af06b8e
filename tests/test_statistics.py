"""Every forward statistic against a per-token reference, and the ranking direction of every criterion.

Part 1 recomputes each MoE layer of a stock tiny model by hand, token by token in float64, from the
inputs its sparse block received (a forward pre-hook on the block; nothing of moetrim's
instrumentation runs) and compares the sums with `moetrim.calibrate`'s profile.

Part 2 plans on profiles (and expert weights) whose statistics the test controls, so that it is
known which dimensions and experts matter most under each criterion, and checks that every
criterion and every allocation keeps those and removes the others.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moetrim
from moetrim import criteria
from moetrim.assets.tiny import tiny_model
from moetrim.calibrate.profile import Profile

# ================================================================================================
# Part 1: statistics against a per-token reference
# ================================================================================================

# How each family's router turns logits into probabilities over all experts (DeepSeek-V3: sigmoid
# scores, the correction bias only steers the choice; everyone else: softmax, GPT-OSS included, whose
# applied weights are a softmax over the chosen logits only).
SIGMOID_ROUTED = {"deepseek_v3"}
STAT_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]


def _sparse_blocks(model):
    """(layer index, block, router, experts) of every sparse block, found by attribute names only."""
    out = []
    for i, layer in enumerate(model.model.layers):
        block = layer.mlp
        experts = getattr(block, "experts", None)
        if isinstance(experts, torch.nn.Module):
            router = block.router if hasattr(block, "router") else block.gate
            out.append((i, block, router, experts))
    return out


def _expert_forward(family: str, experts, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h (intermediate activation) and y (output before gating) of expert e on one token x [H], in float64."""
    x = x.double()
    if family == "gpt_oss":  # [E, H, 2I] interleaved gate/up with biases; down [E, I, H]; clamped SwiGLU
        assert experts.is_transposed and not experts.is_concatenated and experts.has_bias
        gu = x @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()
        gate, up = gu[0::2], gu[1::2]
        gate = gate.clamp(max=experts.limit)
        up = up.clamp(min=-experts.limit, max=experts.limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * experts.alpha))
        y = h @ experts.down_proj[e].double() + experts.down_proj_bias[e].double()
        return h, y
    # [E, 2I, H] = [gate; up] concatenated, down [E, H, I], SiLU
    assert not experts.is_transposed and experts.is_concatenated and not experts.has_bias
    assert experts.config.hidden_act == "silu"
    w = experts.gate_up_proj[e].double()
    width = w.shape[0] // 2
    gu = w @ x
    gate, up = gu[:width], gu[width:]
    h = gate * torch.sigmoid(gate) * up
    y = experts.down_proj[e].double() @ h
    return h, y


def reference_statistics(family: str, model, ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer: every forward statistic, accumulated token by token in float64.

    Besides the true statistics it records a few plausible wrong ones (un-normalised router
    probability as g, ‖g·y‖ instead of ‖y‖) to show the comparison tells them apart."""
    blocks = _sparse_blocks(model)
    inputs: dict[int, torch.Tensor] = {}

    def grab(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            inputs[i] = x.detach().clone()

        return hook

    handles = [block.register_forward_pre_hook(grab(i), with_kwargs=True) for i, block, _, _ in blocks]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    out = {}
    with torch.no_grad():
        for i, _, router, experts in blocks:
            x = inputs[i].reshape(-1, inputs[i].shape[-1])
            logits, weights, index = router(x)  # transformers 5.x routers: (logits, top-k weights, top-k index)
            assert logits.is_floating_point() and weights.is_floating_point() and not index.is_floating_point()
            T, k = index.shape
            E = logits.shape[-1]
            logits = logits.double()
            probs = logits.sigmoid() if family in SIGMOID_ROUTED else logits.softmax(-1)
            width = _expert_forward(family, experts, 0, x[0])[0].shape[0]
            f64 = dict(dtype=torch.float64)
            r = {
                "tokens": torch.tensor(float(T), **f64),
                "prob_sum": torch.zeros(E, **f64),
                "moments": torch.zeros(E, 3, 3, **f64),
                "act_abs_sum": torch.zeros(E, width, **f64),
                "act_sq_sum": torch.zeros(E, width, **f64),
                "act_abs_max": torch.zeros(E, width, **f64),
                "gated_act_abs_sum": torch.zeros(E, width, **f64),
                "gated_act_sq_sum": torch.zeros(E, width, **f64),
                "gated_act_abs_max": torch.zeros(E, width, **f64),
                "out_sum": torch.zeros(E, x.shape[-1], **f64),
                "gated_out_sum": torch.zeros(E, x.shape[-1], **f64),
                "logit_gram": logits.T @ logits,
                "in_gram": torch.zeros(E, x.shape[-1], x.shape[-1], **f64),
                "mid_gram": torch.zeros(E, width, width, **f64),
                "dense_out_sum": torch.zeros(E, x.shape[-1], **f64),
                # Σ router probability of the chosen expert: g only where the model applies it unchanged;
                # the others are wrong on purpose (see test_reference_tells_wrong_statistics_apart)
                "chosen_prob_sum": torch.zeros(E, **f64),
                "wrong_norm_sum_gated": torch.zeros(E, **f64),
                "wrong_out_sum_gated": torch.zeros(E, x.shape[-1], **f64),
                "wrong_in_gram_gated": torch.zeros(E, x.shape[-1], x.shape[-1], **f64),
                "wrong_prob_sum_other_fn": (logits.softmax(-1) if family in SIGMOID_ROUTED else logits.sigmoid()).sum(0),
            }
            for t in range(T):
                r["prob_sum"] += probs[t]
                for e in range(E):
                    r["dense_out_sum"][e] += _expert_forward(family, experts, e, x[t])[1]
                for slot in range(k):
                    e = int(index[t, slot])
                    g = float(weights[t, slot])
                    h, y = _expert_forward(family, experts, e, x[t])
                    n = float(y.norm())
                    for b in range(3):
                        for p in range(3):
                            r["moments"][e, b, p] += g**b * n**p
                    a = h.abs()
                    r["act_abs_sum"][e] += a
                    r["act_sq_sum"][e] += h * h
                    r["act_abs_max"][e] = torch.maximum(r["act_abs_max"][e], a)
                    r["gated_act_abs_sum"][e] += g * a
                    r["gated_act_sq_sum"][e] += (g * h) ** 2
                    r["gated_act_abs_max"][e] = torch.maximum(r["gated_act_abs_max"][e], abs(g) * a)
                    r["chosen_prob_sum"][e] += float(probs[t, e])
                    r["wrong_norm_sum_gated"][e] += abs(g) * n
                    xt = x[t].double()
                    r["out_sum"][e] += y
                    r["gated_out_sum"][e] += g * y
                    r["in_gram"][e] += torch.outer(xt, xt)
                    r["mid_gram"][e] += torch.outer(h.double(), h.double())
                    r["wrong_out_sum_gated"][e] += g * y
                    r["wrong_in_gram_gated"][e] += g * torch.outer(xt, xt)
            out[i] = r
    return out


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 2e-5) -> bool:
    """moetrim keeps h, y and router probabilities in float32 before summing in float64: relative
    agreement to ~1e-6 is expected; every wrong statistic below is off by far more."""
    ours, ref = ours.double(), ref.double()
    atol = 1e-9 * max(float(ref.abs().max()), 1e-30)
    return ours.shape == ref.shape and torch.allclose(ours, ref, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def stat_runs():
    """family -> (MoE layer indices, profile, reference); float64 models, eager experts (the stock
    grouped_mm kernel has no float64), 3 sequences of 16 tokens in two batches (2 + 1)."""
    runs = {}
    ids = torch.randint(0, 127, (3, 16), generator=torch.Generator().manual_seed(11))
    for family in STAT_FAMILIES:
        model = tiny_model(family, seed=2).double()
        model.set_experts_implementation("eager")
        ref = reference_statistics(family, model, ids)
        prof = moetrim.calibrate(model, [ids], seq_len=16, batch_size=2, fisher=False, whiten=True, dense_outputs=True)
        runs[family] = (sorted(ref), prof, ref)
    return runs


EXPERT_ALIASES = {"count": (0, 0), "gate_sum": (1, 0), "norm_sum": (0, 1), "norm_sq_sum": (0, 2), "gated_norm_sum": (1, 1)}


@pytest.mark.parametrize("family", STAT_FAMILIES)
def test_statistics_match_per_token_reference(stat_runs, family):
    layers, prof, ref = stat_runs[family]
    assert prof.layers == layers
    assert prof.tokens == 48
    for l in layers:
        r = ref[l]
        assert float(prof.get(l, "tokens").reshape(())) == float(r["tokens"]) == 48
        # routed-token counts are exact
        assert torch.equal(prof.get(l, "count").double(), r["moments"][:, 0, 0])
        assert float(prof.get(l, "count").sum()) == 48 * 2  # every tiny config routes a token to 2 experts
        for name, (b, p) in EXPERT_ALIASES.items():
            assert _close(prof.get(l, name), r["moments"][:, b, p]), (family, l, name)
        assert _close(prof.get(l, "moments"), r["moments"]), (family, l)
        for name in ("prob_sum", "act_abs_sum", "act_sq_sum", "gated_act_abs_sum", "gated_act_sq_sum", "gated_out_sum", "logit_gram"):
            assert _close(prof.get(l, name), r[name]), (family, l, name)
        # a max is not a sum: it is the float32 rounding of the largest |h| (|g·h|)
        assert _close(prof.get(l, "act_abs_max"), r["act_abs_max"], rtol=1e-6), (family, l)
        assert _close(prof.get(l, "gated_act_abs_max"), r["gated_act_abs_max"], rtol=1e-6), (family, l)
        # every expert that was routed to has a nonzero row: the comparison is not vacuous
        routed = r["moments"][:, 0, 0] > 0
        assert routed.sum() >= 2 and bool((r["act_abs_sum"][routed].sum(1) > 0).all())


@pytest.mark.parametrize("family", STAT_FAMILIES)
def test_output_sums_and_input_grams_match_per_token_reference(stat_runs, family):
    """out_sum (Σ y before gating); with whiten=True, in_gram (Σ x xᵀ of the expert's inputs) and mid_gram
    (Σ h hᵀ of down_proj's inputs); with dense_outputs=True, dense_out_sum (Σ y of every expert on every token)."""
    layers, prof, ref = stat_runs[family]
    for l in layers:
        r = ref[l]
        assert _close(prof.get(l, "out_sum"), r["out_sum"]), (family, l)
        assert _close(prof.get(l, "in_gram"), r["in_gram"]), (family, l)
        assert _close(prof.get(l, "mid_gram"), r["mid_gram"]), (family, l)
        assert _close(prof.get(l, "dense_out_sum"), r["dense_out_sum"]), (family, l)
        assert not _close(prof.get(l, "dense_out_sum"), r["out_sum"]), (family, l)
        assert not _close(prof.get(l, "out_sum"), r["wrong_out_sum_gated"]), (family, l)
        assert not _close(prof.get(l, "in_gram"), r["wrong_in_gram_gated"]), (family, l)
        routed = r["moments"][:, 0, 0] > 0
        assert bool((r["out_sum"][routed].abs().sum(1) > 0).all()) and bool((prof.get(l, "in_gram")[~routed] == 0).all())


def test_output_sums_and_grams_merge_by_addition_and_are_optional(tmp_path):
    """Two half profiles merge into the whole one (out_sum, in_gram included); in_gram is recorded only
    with whiten=True, and a profile without out_sum (older moetrim) still loads and validates."""
    from moetrim.calibrate import load_profile

    model = tiny_model("olmoe", seed=3).double()
    model.set_experts_implementation("eager")
    ids = torch.randint(0, 127, (4, 16), generator=torch.Generator().manual_seed(5))
    halves = [moetrim.calibrate(model, [ids[:2]], seq_len=16, fisher=False, whiten=True, dense_outputs=True),
              moetrim.calibrate(model, [ids[2:]], seq_len=16, fisher=False, whiten=True, dense_outputs=True)]
    whole = moetrim.calibrate(model, [ids], seq_len=16, batch_size=2, fisher=False, whiten=True, dense_outputs=True)
    merged = halves[0].merge(halves[1])
    assert {k.rsplit(".", 1)[1] for k in whole.stats} >= {"out_sum", "in_gram", "mid_gram", "dense_out_sum"}
    for key in whole.stats:
        assert torch.allclose(merged.stats[key], whole.stats[key], rtol=1e-12, atol=1e-12), key
    plain = moetrim.calibrate(model, [ids[:2]], seq_len=16, fisher=False)
    for name in ("in_gram", "mid_gram", "dense_out_sum"):
        assert name not in plain.names() and not any(k.endswith(name) for k in plain.stats)
    with pytest.raises(moetrim.UsageError, match="whiten=True"):
        plain.get(0, "mid_gram")
    with pytest.raises(moetrim.UsageError, match="dense_outputs=True"):
        plain.get(0, "dense_out_sum")
    with pytest.raises(moetrim.UsageError, match="different statistics"):
        plain.merge(halves[1])
    old = Profile({k: v for k, v in plain.stats.items() if not k.endswith("out_sum")}, plain.meta)
    reloaded = load_profile(old.save(tmp_path / "old.safetensors"))
    assert torch.equal(reloaded.get(0, "count"), plain.get(0, "count"))
    with pytest.raises(moetrim.UsageError, match="older moetrim"):
        reloaded.get(0, "out_sum")


def test_reference_tells_wrong_statistics_apart(stat_runs):
    """The tolerance is tight enough that plausible mistakes fail."""
    for family, (layers, prof, ref) in stat_runs.items():
        for l in layers:
            r = ref[l]
            moments = prof.get(l, "moments")
            # |h| summed where h² is meant, and the other way round
            assert not _close(prof.get(l, "act_sq_sum"), r["act_abs_sum"]), family
            assert not _close(prof.get(l, "act_abs_sum"), r["act_sq_sum"]), family
            # g left out of the gated sums
            assert not _close(prof.get(l, "gated_act_abs_sum"), r["act_abs_sum"]), family
            assert not _close(prof.get(l, "gated_norm_sum"), r["moments"][:, 0, 1]), family
            # b and p swapped in the moments
            assert not _close(moments, r["moments"].transpose(1, 2)), family
            # ‖g·y‖ where ‖y‖ (output before gating) is meant
            assert not _close(prof.get(l, "norm_sum"), r["wrong_norm_sum_gated"]), family
            # router probabilities through the other function (sigmoid for softmax routers and back)
            assert not _close(prof.get(l, "prob_sum"), r["wrong_prob_sum_other_fn"]), family
    # g is the weight the model applies: after top-k renormalisation (Mixtral, OLMoE, DeepSeek-V3;
    # GPT-OSS: a softmax over the chosen logits only)
    # and routed scaling (DeepSeek-V3), not the raw router probability of the expert
    for family in ("mixtral", "olmoe", "deepseek_v3", "gpt_oss"):
        layers, prof, ref = stat_runs[family]
        for l in layers:
            assert _close(prof.get(l, "gate_sum"), ref[l]["moments"][:, 1, 0])
            assert not _close(prof.get(l, "gate_sum"), ref[l]["chosen_prob_sum"]), family
    # and where the model applies the raw probability (no renormalisation), the two agree
    for family in ("qwen3_moe", "qwen2_moe", "deepseek_v2"):
        layers, prof, ref = stat_runs[family]
        for l in layers:
            assert _close(prof.get(l, "gate_sum"), ref[l]["chosen_prob_sum"]), family


def test_shared_expert_is_not_in_routed_statistics(stat_runs):
    """Qwen2-MoE's gated shared expert runs on every token but is not a routed expert: the routed
    counts add up to top_k per token and the reference (routed experts only) matches."""
    layers, prof, ref = stat_runs["qwen2_moe"]
    assert layers == [0, 2]  # layer 1 is dense (mlp_only_layers)
    for l in layers:
        assert float(prof.get(l, "count").sum()) == 2 * 48
        assert prof.get(l, "act_abs_sum").shape == (8, 32)  # routed width, not the shared expert's 48


# ================================================================================================
# Part 2: ranking direction of every criterion and allocation
# ================================================================================================

E, I, H = 8, 32, 64
LAYER_SCALE = {0: 1.0, 1: 3.0}  # layer 1's statistics are larger: moves a global budget where comparable


def _importance(gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """[E, I] positive scores with a clear expert order (bases 1.5^0..1.5^7, randomly assigned) and
    distinct values within and across experts (the ranges overlap, so widths vary gradually)."""
    base = 1.5 ** torch.randperm(E, generator=gen).double()
    return scale * base[:, None] * (1 + torch.rand(E, I, generator=gen, dtype=torch.float64))


@pytest.fixture(scope="module")
def ranked():
    """A 2-layer model whose expert weights have controlled row/column norms, a profile whose every
    statistic is a controlled, independent arrangement, and the expected score of every criterion."""
    model = tiny_model("qwen3_moe", num_hidden_layers=2, seed=4)
    gen = torch.Generator().manual_seed(1234)
    layers = [0, 1]
    expected_dims: dict[str, dict[int, torch.Tensor]] = {}
    expected_experts: dict[str, dict[int, torch.Tensor]] = {}
    stats: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for l in layers:
            s = LAYER_SCALE[l]
            ex = model.model.layers[l].mlp.experts
            # weights: unit rows/columns scaled by controlled norms
            gate_n, up_n, down_n = _importance(gen, s), _importance(gen), _importance(gen)
            gu = ex.gate_up_proj  # [E, 2I, H]
            gu.copy_(F.normalize(gu.double(), dim=-1).float())
            gu[:, :I] *= gate_n[..., None].float()
            gu[:, I:] *= up_n[..., None].float()
            dn = ex.down_proj  # [E, H, I]
            dn.copy_(F.normalize(dn.double(), dim=1).float() * down_n[:, None, :].float())
            # what the weight-only criteria should see, read back from the stored float32 weights
            gu64, dn64 = gu.double(), dn.double()
            g_norm, u_norm, d_norm = gu64[:, :I].norm(dim=-1), gu64[:, I:].norm(dim=-1), dn64.norm(dim=1)

            fisher, gm, act_abs, act_sq, gated = (_importance(gen, s) for _ in range(5))
            act_max = _importance(gen, s).float()
            taylor_abs = _importance(gen, s)
            signs = torch.where(torch.rand(E, I, generator=gen) < 0.5, -1.0, 1.0).double()
            stats[f"layers.{l}.fisher"] = fisher
            stats[f"layers.{l}.grad_magnitude"] = gm
            stats[f"layers.{l}.taylor"] = taylor_abs * signs
            stats[f"layers.{l}.act_abs_sum"] = act_abs
            stats[f"layers.{l}.act_sq_sum"] = act_sq
            stats[f"layers.{l}.act_abs_max"] = act_max
            stats[f"layers.{l}.gated_act_abs_sum"] = gated
            dims = {
                "fisher": fisher,
                "grad_magnitude": gm,
                "taylor": taylor_abs,  # |Σ ∂L/∂m|: the signs must not matter
                "activation": act_abs,
                "max_activation": act_max.double(),
                "router_weighted": gated,
                "output_aware": act_sq.sqrt() * d_norm,
                "magnitude": g_norm * u_norm * d_norm,
            }
            # CAMERA-P: ||down[:, j]||^2 (0.1 Σ (g h)^2 + 0.9 max |g h|^2), from its own two statistics
            gated_sq, gated_max = _importance(gen, s), _importance(gen, s).float()
            stats[f"layers.{l}.gated_act_sq_sum"] = gated_sq
            stats[f"layers.{l}.gated_act_abs_max"] = gated_max
            dims["camera"] = d_norm.pow(2) * (0.1 * gated_sq + 0.9 * gated_max.double().pow(2))
            for name, v in dims.items():
                expected_dims.setdefault(name, {})[l] = v

            # experts: moments [E, b, p] with an independent expert order in every entry
            count = 5 * 2 ** torch.randperm(E, generator=gen).double() + l  # 5..641: divides the order thoroughly
            moments = torch.empty(E, 3, 3, dtype=torch.float64)
            for b in range(3):
                for p in range(3):
                    moments[:, b, p] = s * (1.7 ** torch.randperm(E, generator=gen).double()) * (1 + 0.3 * torch.rand(E, generator=gen, dtype=torch.float64))
            moments[:, 0, 0] = count
            prob = s * 1.6 ** torch.randperm(E, generator=gen).double()
            stats[f"layers.{l}.moments"] = moments
            stats[f"layers.{l}.prob_sum"] = prob
            stats[f"layers.{l}.tokens"] = torch.tensor([64.0], dtype=torch.float64)
            # MoNE: mean gate over the 64 tokens times the output spread, √((Σ‖y‖² − ‖Σy‖²/n) / (n − 1)); Σy is set at a
            # random fraction of its largest possible norm, so the spread is positive and independent of the moments
            share = 1 - 10 ** (-3 * torch.rand(E, generator=gen, dtype=torch.float64))  # spreads over 3 decades
            direction = F.normalize(torch.randn(E, H, generator=gen, dtype=torch.float64), dim=1)
            out_sum = direction * (share * (count * moments[:, 0, 2])).sqrt()[:, None]
            stats[f"layers.{l}.out_sum"] = out_sum
            spread = ((moments[:, 0, 2] - out_sum.pow(2).sum(1) / count) / (count - 1)).sqrt()
            theta = torch.cat([gu64.flatten(1), dn64.flatten(1)], dim=1)
            m = moments
            exp = {
                "frequency": m[:, 0, 0],
                "soft_frequency": m[:, 1, 0],
                "ean": m[:, 0, 1],
                "reap": m[:, 1, 1] / m[:, 0, 0],
                "man": m[:, 0, 1] / m[:, 0, 0],
                "msan": m[:, 0, 2] / m[:, 0, 0],
                "soft_frequency_prob": prob,
                "mone": m[:, 1, 0] / 64 * spread,
                "aimer": 1 - theta.abs().mean(1) / theta.pow(2).mean(1).sqrt(),  # weights only
            }
            for name, v in exp.items():
                expected_experts.setdefault(name, {})[l] = v

    # the key set, shapes and dtypes calibrate writes (with gradients and grad-magnitude), and its meta
    ids = torch.randint(0, 127, (1, 8), generator=torch.Generator().manual_seed(0))
    template = moetrim.calibrate(model, [ids], seq_len=8, batch_size=1, grad_magnitude=True)
    assert set(stats) <= set(template.stats), sorted(set(stats) - set(template.stats))
    controlled = {}
    for key, t in template.stats.items():
        v = stats.get(key, t)  # a statistic this file does not know keeps calibrate's value
        assert tuple(v.shape) == tuple(t.shape), key
        controlled[key] = v.to(t.dtype)
    meta = dict(template.meta, tokens="64", sequences="4")
    profile = Profile(controlled, meta)
    # the profile returns exactly what was put in
    for key, v in stats.items():
        _, l, name = key.split(".")
        assert torch.equal(profile.get(int(l), name).double(), v.to(template.stats[key].dtype).double())
    return model, profile, expected_dims, expected_experts


def _comparable(name: str, level: str) -> bool:
    return criteria.get_criterion(name, level).comparable_across_layers


def _normalised(scores: dict[int, torch.Tensor], comparable: bool) -> dict[int, torch.Tensor]:
    """README: criteria not comparable across layers are divided by their layer's mean first."""
    return {l: s if comparable else s / s.abs().mean() for l, s in scores.items()}


REL = 1e-9  # float ties at this level may go either way


def _check_dim_plan(plan, scores: dict[int, torch.Tensor], allocation: str, comparable: bool, min_width: int, exempt=frozenset()):
    """Within every expert the kept dims are its top-scored ones; across the allocation's pool (the
    model for global, the layer for layer) no removed dim outscores a kept one, except the
    `min_width` best dims of every expert, which are kept regardless (and `exempt` (layer, expert,
    dim) triples, kept by another rule)."""
    normed = _normalised(scores, comparable)
    pools: dict[object, tuple[list[float], list[float]]] = {}
    for lp in plan.layers:
        s = scores[lp.layer]
        assert lp.experts_before == E and lp.width_before == I
        kept_by_expert = dict(zip(lp.kept_experts, lp.kept_dims))
        key = "all" if allocation == "global" else lp.layer
        kept_vals, removed_vals = pools.setdefault(key, ([], []))
        for e in range(E):
            dims = kept_by_expert.get(e, [])
            assert len(dims) == len(set(dims))
            order = torch.sort(s[e], descending=True).indices.tolist()
            kept, removed = set(dims), [j for j in range(I) if j not in set(dims)]
            if dims and removed:  # top-scored within the expert
                assert float(s[e, dims].min()) >= float(s[e, removed].max()) * (1 - REL), (lp.layer, e)
            floor = set(order[:min_width])
            kept_vals.extend(float(normed[lp.layer][e, j]) for j in kept - floor if (lp.layer, e, j) not in exempt)
            removed_vals.extend(float(normed[lp.layer][e, j]) for j in removed)
    if allocation in ("global", "layer"):
        for key, (kept_vals, removed_vals) in pools.items():
            assert kept_vals and removed_vals
            assert min(kept_vals) >= max(removed_vals) * (1 - REL), key
    else:  # uniform: one width everywhere
        assert len({w for lp in plan.layers for w in lp.widths}) == 1


DIM_CRITERIA = [n for n in criteria.names("dim") if n != "random"]
EXPERT_CRITERIA = [n for n in criteria.names("expert") if n not in ("random", "unified")]


def test_every_registered_criterion_is_covered():
    assert set(criteria.names("dim")) == {*DIM_CRITERIA, "random"}
    known_dims = {"fisher", "grad_magnitude", "taylor", "activation", "max_activation", "router_weighted", "output_aware", "magnitude",
                  "camera"}
    known_experts = {"frequency", "soft_frequency", "ean", "reap", "man", "msan", "soft_frequency_prob", "mone", "aimer"}
    assert set(DIM_CRITERIA) == known_dims, "a new dim criterion needs an expected score in ranked()"
    assert set(EXPERT_CRITERIA) == known_experts, "a new expert criterion needs an expected score in ranked()"


@pytest.mark.parametrize("allocation", ["global", "layer", "uniform"])
@pytest.mark.parametrize("criterion", DIM_CRITERIA)
def test_dim_plans_keep_the_most_important_dims(ranked, criterion, allocation):
    model, profile, expected, _ = ranked
    scores = expected[criterion]
    plan = moetrim.make_plan(model, profile, granularity="dims", criterion=criterion, ratio=0.5, allocation=allocation)
    min_width = plan.min_width if plan.min_width is not None else 1
    _check_dim_plan(plan, scores, allocation, _comparable(criterion, "dim"), min_width)
    if allocation in ("global", "layer"):
        for lp in plan.layers:  # the strongest expert keeps more width than the weakest
            mean = scores[lp.layer].mean(1)
            width = dict(zip(lp.kept_experts, lp.widths))
            assert width.get(int(mean.argmax()), 0) > width.get(int(mean.argmin()), 0), lp.layer
    if allocation == "global" and _comparable(criterion, "dim"):
        # layer 1's statistics are 3x layer 0's: it keeps more of the budget
        kept = {lp.layer: sum(lp.widths) for lp in plan.layers}
        assert kept[1] > kept[0]


@pytest.mark.parametrize("allocation", ["global", "layer"])
def test_dims_min_width_zero_removes_weakest_experts_and_keeps_best_one(ranked, allocation):
    """With --min-width 0 whole experts can go: the weakest ones. A layer that would lose every
    dimension keeps its best expert's best dimension."""
    model, profile, expected, _ = ranked
    stats = dict(profile.stats)
    fisher = {l: expected["fisher"][l] * (1.0 if l == 0 else 1e-6) for l in (0, 1)}
    stats["layers.1.fisher"] = fisher[1]
    prof = Profile(stats, dict(profile.meta))
    plan = moetrim.make_plan(model, prof, criterion="fisher", ratio=0.8, allocation=allocation, min_width=0)
    assert all(len(lp.kept_experts) < E for lp in plan.layers)  # whole experts removed
    if allocation == "global":  # layer 1 scores a millionth of layer 0: the budget all goes to layer 0
        best = int(fisher[1].sum(1).argmax())
        best_dim = int(fisher[1][best].argmax())
        assert plan.layers[1].kept_experts == [best] and plan.layers[1].kept_dims == [[best_dim]]
        _check_dim_plan(plan, fisher, allocation, True, 0, exempt={(1, best, best_dim)})
    else:
        _check_dim_plan(plan, fisher, allocation, True, 0)


def test_protect_keeps_largest_max_activation_dims(ranked):
    model, profile, expected, _ = ranked
    act = expected["activation"][0]
    # the three weakest dims by activation (never an expert's best) get the largest max|h| of the layer
    weakest = torch.sort(act.flatten()).indices[:3].tolist()
    act_max = profile.get(0, "act_abs_max").clone()
    for t in weakest:
        act_max.view(-1)[t] = float(act_max.max()) * 2 + t
    stats = dict(profile.stats)
    stats["layers.0.act_abs_max"] = act_max
    prof = Profile(stats, dict(profile.meta))
    plan = moetrim.make_plan(model, prof, criterion="activation", ratio=0.9, allocation="layer", min_width=1, protect=3)
    lp = plan.layers[0]
    kept = {(e, d) for e, dims in zip(lp.kept_experts, lp.kept_dims) for d in dims}
    assert all((t // I, t % I) in kept for t in weakest)
    unprotected = moetrim.make_plan(model, profile, criterion="activation", ratio=0.9, allocation="layer", min_width=1)
    lp = unprotected.layers[0]
    kept = {(e, d) for e, dims in zip(lp.kept_experts, lp.kept_dims) for d in dims}
    assert not any((t // I, t % I) in kept for t in weakest)


def _expected_removed_experts(scores: dict[int, torch.Tensor], allocation: str, comparable: bool, ratio: float):
    if allocation in ("layer", "uniform"):
        n = int(round(ratio * E))
        return {l: set(torch.sort(s).indices[:n].tolist()) for l, s in scores.items()}
    normed = _normalised(scores, comparable)
    flat = [(float(v), l, e) for l, s in normed.items() for e, v in enumerate(s.tolist())]
    flat.sort()
    n = int(round(ratio * E * len(scores)))
    removed = {l: set() for l in scores}
    for _, l, e in flat[:n]:
        removed[l].add(e)
    assert all(len(r) < E for r in removed.values())  # the keep-one-expert floor does not bind here
    return removed


def _check_expert_plan(plan, removed_expected):
    for lp in plan.layers:
        removed = set(range(E)) - set(lp.kept_experts)
        assert removed == removed_expected[lp.layer], (lp.layer, sorted(removed), sorted(removed_expected[lp.layer]))
        assert lp.kept_dims is None and lp.widths == [I] * len(lp.kept_experts)


@pytest.mark.parametrize("allocation", ["global", "layer", "uniform"])
@pytest.mark.parametrize("criterion", EXPERT_CRITERIA)
def test_expert_plans_remove_the_least_important_experts(ranked, criterion, allocation):
    model, profile, _, expected = ranked
    scores = expected[criterion]
    plan = moetrim.make_plan(model, profile, granularity="experts", criterion=criterion, ratio=0.5, allocation=allocation)
    _check_expert_plan(plan, _expected_removed_experts(scores, allocation, _comparable(criterion, "expert"), 0.5))


def test_expectations_differ_between_criteria(ranked):
    """The fixture gives every criterion its own answer, so a criterion that read the wrong
    statistic (or the wrong moment) would fail as well."""
    _, _, expected_dims, expected_experts = ranked
    answers = {}
    for name in EXPERT_CRITERIA:
        r = _expected_removed_experts(expected_experts[name], "layer", True, 0.5)
        answers[name] = tuple(tuple(sorted(r[l])) for l in sorted(r))
    twins = {name: [o for o in answers if o != name and answers[o] == a] for name, a in answers.items()}
    assert len(set(answers.values())) == len(answers), {n: t for n, t in twins.items() if t}
    for e in range(E):  # the best half of every expert's dims, per dim criterion
        halves = {name: tuple(frozenset(torch.sort(s[l][e], descending=True).indices[: I // 2].tolist()) for l in s) for name, s in expected_dims.items()}
        assert len(set(halves.values())) == len(halves), e


@pytest.mark.parametrize("allocation", ["global", "layer"])
@pytest.mark.parametrize("exponents", [[0.0, 1, 1], [1.0, 2, 0], [0.5, 0, 2], [2.0, 1, 2]])
def test_unified_expert_plans(ranked, exponents, allocation):
    """S(a, b, p) = |R_e|^(a-1) · Σ g^b ‖y‖^p, from the moments."""
    model, profile, _, _ = ranked
    a, b, p = exponents
    scores = {}
    for l in (0, 1):
        m = profile.get(l, "moments").double()
        scores[l] = m[:, 0, 0] ** (a - 1) * m[:, b, p]
    plan = moetrim.make_plan(
        model, profile, granularity="experts", criterion="unified", ratio=0.5, allocation=allocation, exponents=exponents
    )
    _check_expert_plan(plan, _expected_removed_experts(scores, allocation, _comparable("unified", "expert"), 0.5))


@pytest.mark.parametrize("granularity", ["dims", "experts"])
def test_random_is_deterministic_per_seed(ranked, granularity):
    model, profile, _, _ = ranked
    for allocation in ("global", "layer", "uniform"):
        a = moetrim.make_plan(model, profile, granularity=granularity, criterion="random", allocation=allocation, seed=3)
        b = moetrim.make_plan(model, profile, granularity=granularity, criterion="random", allocation=allocation, seed=3)
        c = moetrim.make_plan(model, profile, granularity=granularity, criterion="random", allocation=allocation, seed=4)
        assert a.to_json() == b.to_json()
        assert a.layers != c.layers
        # and without a profile: random needs none
        d = moetrim.make_plan(model, None, granularity=granularity, criterion="random", allocation=allocation, seed=3)
        assert d.layers == a.layers
