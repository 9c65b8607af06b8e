#!/usr/bin/env python
"""Check moetrim's `mone` expert criterion and MoNE novice vectors against the MoNE authors' own code, on a bundled model.

It is not vendored (their code stays theirs), so give a clone of zxgx/mode-pd (ICLR 2026, "MoNE"):

    git clone https://github.com/zxgx/mode-pd /tmp/MONEclone
    python scripts/check_mone_against_authors.py /tmp/MONEclone [--model longtail] [--ratio 0.5]
        [--step-tokens 1] [--branch deepseek|olmoe]

What runs: moetrim calibrates the model (forward only, seq_len 256, batch size 8, 8 texts per trained
domain) and a forward hook on each MoE layer's router records, on those same tokens, the router's input
x [T, H] and its outputs (logits, the top-k weights the model applies, the top-k expert ids). Then their
`modepd.pruning.expert_prune.expert_prune_by_mone` runs unchanged on the CPU with their MoNE settings
(mone_ranking_metric="fusion", fusion_io_weight=0.5, expert_ranking_scope="layer", no zero_out_novice, no
novice evolving, preserve_n_experts = E - round(ratio * E)). Their code only runs on DeepSeek / OLMoE
models of transformers 4 (per-expert nn.Linear modules, `model.cuda()`), so what we feed it as `model` is
a stand-in: `model.model.layers[j].mlp` (j: the j-th MoE layer) has a `gate` and `experts[e]` modules,
and each stand-in forward replays one recorded step: the gate is called with the step's x [T, H] and
returns what the chosen branch of their gate hook reads, then every expert with routed tokens is called
with exactly those tokens' x and returns the expert's ungated output y, computed from moetrim's view of
the expert's weights (act(x gateᵀ) · (x upᵀ)) downᵀ; experts with no token that step are not called (as
DeepSeek's `moe_infer`; their hook would divide 0/0). Their own forward hooks (the gate hook and
`stateful_expert_hook` on every expert) collect the statistics, and their code ranks, thresholds and
builds the novices. Their `model.cuda()` is the stand-in's no-op and `torch.cuda.current_device()`
answers "cpu" for the length of the call; their DeepSeek modelling file imports
`transformers.utils.import_utils.is_torch_fx_available`, gone from transformers 5, so a stand-in
answering False is put there while their module imports. Their scores (`metric_list`) and statistics
(`bias_stats`, `routing_stats`) are local variables: they are read from the function's frame as it returns
(sys.setprofile), nothing of theirs is edited.

--branch deepseek (default): the gate returns (top-k ids, top-k weights the model applies), read by
their DeepSeek branch as the gate's `topk_idx, topk_weight` (MoEGate returns the weights DeepSeek
applies: renormalised when norm_topk_prob, times routed_scaling_factor). --branch olmoe: the gate
returns the router logits and their OLMoE branch takes softmax + top-k itself, never renormalising (right
for OLMoE, norm_topk_prob=False, and for the Qwen2-MoE model; the Qwen3-MoE model renormalises, so there
the gate factor is expected to differ). The gate sees x flattened to [T, H] (OLMoE's and Qwen's routers
do); in a real DeepSeek model their gate hook's `_input[0].shape[0]` is the number of sequences, not
tokens, a factor common to every expert and layer.

Formulas (g: the weight applied to a routed token, 0 when not routed; y: the expert's ungated output;
R_e the tokens routed to e, n_e = |R_e|; T all tokens):
  both    gate factor r_e = Σ_T g / T (theirs: a running mean over steps; exact up to rounding)
  ours    spread      s_e = sqrt(Σ_d Var_d) = sqrt((Σ_{R_e} ‖y‖² − ‖Σ_{R_e} y‖² / n_e) / (n_e − 1)), exact
  theirs  spread      ‖sqrt(fluc)‖₂, fluc [H] a running per-dimension variance over R_e: on an expert call
                      with t tokens after n, mean ← running mean over the n + t; then, except on the expert's
                      first call, fluc ← fluc·(n−1)/(n+t−1) + Σ_t (y − mean)² / (n+t)
  both    score       r_e · s_e (theirs: (0.5 s_e)·(0.5 r_e), a constant factor)
  both    novice      v_e = Σ_{R_e} y / n_e, the unweighted mean ungated output (theirs: the running mean
                      `baseline_out`, cast to bfloat16 when stored); a token routed to a novice gets g · v_e.
Their fluc drops the first call's own sum of squares, counts the between-call term n·t/(n+t)·δ² as
n²t/(n+t)²·δ² and divides by n+t, not n+t−1: it never exceeds the exact variance, by how much depends
on how the tokens are cut into calls. So their code runs twice:
  A  every recorded token as one step, twice. Their running mean is exact after the first step and their
     fluc is then Σ_{R_e} (y − v_e)² / (2 n_e), so their spread must be s_e · sqrt((n_e − 1) / (2 n_e)) and
     their gate factor and means r_e and v_e, to float32 rounding; their token counts must be 2 n_e.
     This is the check (1e-5 relative; the novice difference is relative to the layer's largest |v| entry).
  B  their loop as it runs: the recorded tokens streamed in steps of --step-tokens (default 1; 0: one
     calibration batch a step, as their loop takes one dataloader batch). Its line shows the largest score
     difference (theirs / 0.25 vs ours, relative to the layer's largest score), their spread's relative
     shortfall over experts with two or more tokens, and whether both make the same experts novices at the
     ratio (ours: the lowest round(ratio · E) scores; theirs: scores not above the (E − that)-th largest).
     Their running estimate is not ours, so B fails only if their spread exceeds ours.

Exit 1 when a layer's check A disagrees (or B's spread exceeds ours beyond rounding). Expected failure:
--branch olmoe on the Qwen3-MoE model (renormalised top-k weights), gate factor only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


def _import_theirs(clone: Path):
    """Their expert_prune module, imported from the clone (with the one transformers-4 name it needs)."""
    import transformers.utils.import_utils as iu

    added = not hasattr(iu, "is_torch_fx_available")
    if added:
        iu.is_torch_fx_available = lambda: False
    sys.path.insert(0, str(clone))
    try:
        return importlib.import_module("modepd.pruning.expert_prune")
    finally:
        if added:
            del iu.is_torch_fx_available


class _Gate(nn.Module):
    """Returns what their gate hook reads for the current step (set by the stand-in layer)."""

    def __init__(self, branch: str):
        super().__init__()
        self.branch, self.current = branch, None

    def forward(self, x):
        logits, weights, ids = self.current
        return logits if self.branch == "olmoe" else (ids, weights, None)


class _Expert(nn.Module):
    """Expert e's ungated output on the tokens it is called with, from moetrim's view of its weights."""

    def __init__(self, layer, e: int):
        super().__init__()
        self.w, self.act = layer.expert(e), layer.activation()

    def forward(self, x):
        w = self.w
        up = F.linear(x, w.up, w.up_bias)
        h = self.act(F.linear(x, w.gate, w.gate_bias) if w.gate is not None else None, up)
        return F.linear(h, w.down, w.down_bias)


class _Standin(nn.Module):
    """What their expert_prune_by_mone takes for `model`: each call replays one recorded step."""

    def __init__(self, layers, steps, branch: str):
        super().__init__()
        E = layers[0].num_experts
        self.steps = steps
        self.config = SimpleNamespace(
            model_type="olmoe" if branch == "olmoe" else "deepseek_v2", num_hidden_layers=len(layers),
            hidden_size=layers[0].hidden_size, intermediate_size=layers[0].widths[0], moe_intermediate_size=layers[0].widths[0],
            num_experts=E, n_routed_experts=E, num_experts_per_tok=layers[0].top_k, first_k_dense_replace=0, moe_layer_freq=1)
        blocks = []
        for layer in layers:
            mlp = nn.Module()
            mlp.gate = _Gate(branch)
            mlp.experts = nn.ModuleList(_Expert(layer, e) for e in range(E))
            blk = nn.Module()
            blk.mlp = mlp
            blocks.append(blk)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(blocks)

    def cuda(self, *a, **k):
        return self

    def cpu(self):
        return self

    @torch.no_grad()
    def forward(self, step):
        for blk, (x, logits, weights, ids) in zip(self.model.layers, self.steps[int(step)]):
            mlp = blk.mlp
            mlp.gate.current = (logits, weights, ids)
            mlp.gate(x)
            for e in ids.unique().tolist():  # the experts with tokens this step, in id order
                mlp.experts[e](x[(ids == e).any(-1)])


def _record(model, layers):
    """Forward hooks on the routers: per calibration batch, per MoE layer, (x, logits, weights, ids)."""
    calls: list[list] = [[] for _ in layers]
    handles = []
    for j, layer in enumerate(layers):
        def hook(module, inputs, output, j=j):
            logits, weights, ids = output
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            calls[j].append(tuple(t.detach().float().clone() for t in (x, logits, weights)) + (ids.detach().clone(),))
        handles.append(layer.router.register_forward_hook(hook))
    return calls, handles


def _streamed(calls, step_tokens: int):
    """The recorded batches cut into steps of step_tokens tokens (0: one step a batch), in calibration order."""
    out = []
    for b in range(len(calls[0])):
        T = calls[0][b][0].shape[0]
        size = T if step_tokens <= 0 else step_tokens
        for s in range(0, T, size):
            out.append([tuple(t[s : s + size] for t in calls[j][b]) for j in range(len(calls))])
    return out


def _whole_twice(calls):
    """Every recorded token as one step, twice."""
    whole = [tuple(torch.cat(parts) for parts in zip(*calls[j])) for j in range(len(calls))]
    return [whole, whole]


def _run_theirs(theirs, layers, steps, branch: str, preserve: int):
    """Their expert_prune_by_mone on a stand-in replaying `steps`; its locals as it returns."""
    args = SimpleNamespace(mone_ranking_metric="fusion", fusion_io_weight=0.5, expert_ranking_scope="layer",
                           preserve_n_experts=preserve, max_steps=len(steps), zero_out_novice=False, enable_novice_evolving=False)
    loader = [{"step": torch.tensor(i)} for i in range(len(steps))]
    code, seen = inspect.unwrap(theirs.expert_prune_by_mone).__code__, {}  # under its @torch.no_grad()

    def profiler(frame, event, arg):
        if event == "return" and frame.f_code is code:
            seen.update(frame.f_locals)

    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    sys.setprofile(profiler)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # their tqdm bar
            theirs.expert_prune_by_mone(args, _Standin(layers, steps, branch), loader)
    finally:
        sys.setprofile(None)
        torch.cuda.current_device = current_device
    return seen


def _theirs(seen, j: int, E: int):
    """Layer j's (score / (w (1 - w)), gate factor, spread, running mean [E, H], tokens seen, novices)."""
    stats = [seen["bias_stats"][f"layers.{j}.experts.{e}"] for e in range(E)]
    w = seen["args"].fusion_io_weight
    return (seen["metric_list"][j].double() / (w * (1 - w)), seen["routing_stats"][j]["scores"].double(),
            torch.stack([s["fluc_out"] for s in stats]).double().sqrt().norm(dim=1),
            torch.stack([s["baseline_out"] for s in stats]).double(), torch.tensor([float(s["num_tokens"]) for s in stats]).double(),
            set(seen["model"].config.approximate_experts[j]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clone", type=Path, help="a clone of github.com/zxgx/mode-pd")
    ap.add_argument("--model", default="longtail", help="bundled model (reference or longtail)")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of each layer's experts made novices")
    ap.add_argument("--step-tokens", type=int, default=1, help="tokens per streamed step (0: one calibration batch a step)")
    ap.add_argument("--branch", choices=("deepseek", "olmoe"), default="deepseek", help="which branch of their gate hook reads the routing")
    args = ap.parse_args(argv)
    if not (args.clone / "modepd" / "pruning" / "expert_prune.py").is_file():
        ap.error(f"{args.clone} has no modepd/pruning/expert_prune.py: give a clone of zxgx/mode-pd")
    theirs = _import_theirs(args.clone)

    import moetrim
    from moetrim import criteria
    from moetrim.assets import BUNDLED, bundled_name, trained_domains
    from moetrim.calibrate import calibrate
    from moetrim.data.tasks import DOMAINS, calibration_texts
    from moetrim.model.view import find_moe_layers
    from moetrim.plan.cluster import mean_outputs

    key = args.model if args.model in BUNDLED else bundled_name(args.model)
    if key is None:
        ap.error(f"--model: {args.model!r} is not a bundled model; choose one of {', '.join(BUNDLED)}")
    model, tok = moetrim.reference_model(key)
    model.float()
    layers = find_moe_layers(model)
    texts = calibration_texts(trained_domains(BUNDLED[key]) or list(DOMAINS), n_per_domain=8, seed=0)
    calls, handles = _record(model, layers)
    try:
        profile = calibrate(model, texts, tokenizer=tok, seq_len=256, batch_size=8, seed=0, fisher=False)
    finally:
        for h in handles:
            h.remove()
    E = layers[0].num_experts
    n_prune = int(round(args.ratio * E))
    streamed = _streamed(calls, args.step_tokens)
    exact = _run_theirs(theirs, layers, _whole_twice(calls), args.branch, E - n_prune)
    stream = _run_theirs(theirs, layers, streamed, args.branch, E - n_prune)
    print(f"{key}: {int(profile.meta['tokens'])} tokens ({len(calls[0])} calibration batches); their {args.branch} branch; "
          f"A: all tokens as one step, twice; B: {len(streamed)} steps of {args.step_tokens or 'a batch of'} tokens; novices at {args.ratio:.0%}")
    bad = 0
    for j, layer in enumerate(layers):
        i = layer.index
        ours = criteria.score("mone", "expert", profile, layer)
        n = profile.get(i, "count").double()
        gate = profile.get(i, "gate_sum").double() / float(profile.get(i, "tokens").reshape(()))
        spread = torch.where(n > 1, ours / gate.clamp(min=1e-300), torch.zeros_like(ours))
        mean = mean_outputs(profile, i)
        pruned = set(torch.sort(ours, descending=True, stable=True).indices[E - n_prune :].tolist())

        # A: their running mean is exact after the first step, their fluctuation sums the second step: Σ(y - m)² / (2n)
        _, g_a, s_a, m_a, n_a, _ = _theirs(exact, j, E)
        d_gate = float((g_a - gate).abs().max() / gate.abs().max())
        want = spread * ((n - 1).clamp(min=0) / (2 * n).clamp(min=1)).sqrt()
        d_spread = float((s_a - want).abs().max() / want.abs().max())
        d_novice = float((m_a - mean)[n > 0].abs().max() / mean.abs().max())
        routed = bool(torch.equal(n_a, 2 * n))
        # B: their loop as it runs, streaming the tokens
        sc_b, _, s_b, _, _, pruned_b = _theirs(stream, j, E)
        d_score = float((sc_b - ours).abs().max() / ours.abs().max())
        rel = (s_b - spread)[n > 1] / spread[n > 1]
        same = pruned_b == pruned
        print(f"layer {i}: A gate {d_gate:.1e}, spread {d_spread:.1e}, novice {d_novice:.1e}, same routing {routed}; "
              f"B score {d_score:.1e}, spread {float(rel.min()):+.0e}..{float(rel.max()):+.0e}, same novices at {args.ratio:.0%}: {same}"
              + ("" if same else f" (theirs only {sorted(pruned_b - pruned)}, ours only {sorted(pruned - pruned_b)})"))
        bad += not routed or max(d_gate, d_spread, d_novice) > 1e-5 or float(rel.max()) > 1e-5
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
