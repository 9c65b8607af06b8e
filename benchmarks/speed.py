"""Speed and memory of compressed MoE models at real layer shapes.

For each model the real shapes (hidden size, experts, top-k, expert and shared widths, vocabulary,
attention) are built with random weights and only a few decoder layers, so they fit this machine.
Every variant is measured side by side with dense in the same run (rounds, median ratio; below), and
figures are extrapolated to full depth by calculation from per-part timings:

    T_full = T_outside_layers + L_full * mean(T_layer),   share s = L_full * T_experts / T_full
    bound  = 1 / ((1 - s) + s * (1 - r))                  r = routed-expert weight fraction removed

`bound` is the speed-up that removing those weights could give at most if routed-expert time fell
in proportion to their weights (Amdahl); measured/bound says how close the runtime gets. Both sides
run one kernel: s is the share of varwidth-0% (moetrim's experts module at full width, the module
every trimmed variant runs on), and the variant's speed-up is taken against varwidth-0%, in the same
rounds for the target variants. (A share taken from the stock model, with speed-ups against stock
dense, would credit the bound with whatever the module gains at 0%, up to 1.5x here.) `r` is
1 - (routed weights the variant touched) / (routed weights dense touched on the same inputs), each
expert's width counted per token routed to it in prefill (compute-bound) and per call that hit it
in decode (memory-bound: a weight is read once per step). A few decode steps touch only some
experts, and under non-uniform widths those may have kept more or less than the average; removing
weights nobody reads cannot speed anything up, and pruning whole experts leaves a token's k
experts as wide as before. `*_bound_nominal` uses the overall removed fraction instead; `*_bound`
and `*_vs_bound` (JSON only) are the old stock-share figures, kept for comparison.

Global against uniform compares two variants on the same module: uniform trimming is run on moetrim's
module too (`dims-50%-uniform-vw`, force_varwidth), so the ratio is the cost of uneven widths and not
of the kernel. The standard uniform checkpoint on stock experts (`dims-50%-uniform`), what its users
get, is measured against dense beside it.

Decode steps run the model body on next tokens taken from the prompt ids after a 16-token prompt
whose KV cache is built once per variant and copied for each measurement. Every round feeds tokens of
its own, the same for every variant in that round (so routing is identical within a round and each
round's ratios compare equal work), and the rounds together sample more of the routing than one fixed
set: the experts a few tokens hit may have kept more or less than the average (see `r` above). At
batch 1 each round decodes another of the 8 sequences, since a sequence's tokens favour experts of
their own (at Mixtral's shapes one expert took 8.5% of one sequence's slots and 22.5% of another's,
over 512 tokens each), so one sequence alone would decide which widths batch 1 reads. The
LM head's one-token time is measured once per model and added to every decode total, since it is the
same module in every variant. Batch 1 runs more steps than batch 8 so that
its few experts per step still add up to a representative sample of the layer's experts.

Variants are measured in groups, each together with dense: (varwidth-0%, 50% global, 50% uniform-vw),
(50% uniform, 25% uniform: stock), (25% global, 25% uniform-vw), (experts 25%, 50%). After a warm-up (a short prompt, one decode step; the
whole prompt in the varwidth-0% group where it is cheap, see below), a group runs in rounds. In a
decode round every model of the group advances in lockstep, one step each in turn, the order rotated
every step; in a prefill round each model runs one prompt, the order rotated every round. A slow
phase of this shared machine lasts longer than a step (pairs of identical work run a few seconds
apart differed by up to 25% here), so lockstep makes it hit every model alike. A speed-up is the
median of the rounds' own ratios (`*_speedup_pairs`); `*_speedup_fastest`, each side's fastest round
against the other's, is kept for comparison.

Rounds go where the targets are (the whole --quick run stays under 10 minutes here: 346 s in the committed run). The
groups the targets read get --repeats decode rounds. The varwidth-0% group (the only prefill target)
gets one prefill round more than --repeats, after a whole-prompt warm-up, where a dense prompt takes
at most PREFILL_CHEAP_S (single prompts of identical work differ by 10% and more here), else two
fewer (at least 2: Mixtral, whose prompt takes 6-7 s). The groups no target reads (25% and expert
pruning) get one round of each regime at half the decode steps. Batch-8 decode runs a third of the
steps where one step reads nearly every expert of the layer (Mixtral: 16 slots over 8 experts). The
50% global and uniform-vw variants share their rounds, so the global/uniform target
(`decode*_vs_uniform_direct`) is measured side by side as well.

Dense is the stock `transformers` model with the fastest experts implementation it offers for that
regime (each of grouped_mm / eager / batched_mm measured; batched_mm skipped for prefill, where it
copies weights per token). Global variants use widths drawn around the target ratio (random
weights carry no importance signal to rank by; see --width-spread).

    python benchmarks/speed.py --quick            # about 6 minutes on 2 CPU cores
    python benchmarks/speed.py --device cuda --dtype bfloat16 --out benchmarks/results/speed-gpu.json

A missed target is an error: the results and tables are written, then the missed targets are listed
on stderr and the exit status is 1 (`--no-fail` lists them and exits 0). `--report-only` checks the
same way.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from moetrim.apply.slicing import apply_plan, shared_copy
from moetrim.evaluate.summary import weight_bytes
from moetrim.evaluate.throughput import prefill_seconds
from moetrim.model.kv_cache import cache_kwargs, cache_of
from moetrim.model.view import find_moe_layers
from moetrim.plan import make_plan

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import update_section, write_json  # noqa: E402

# Real shapes (from the public configs of these checkpoints).
MODELS = {
    "Qwen1.5-MoE-A2.7B": dict(
        model_type="qwen2_moe", hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
        num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        intermediate_size=5632, full_layers=24, tie_word_embeddings=False,
    ),
    "OLMoE-1B-7B": dict(
        model_type="olmoe", hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304,
        num_experts=64, num_experts_per_tok=8, intermediate_size=1024, full_layers=16, tie_word_embeddings=False,
    ),
    "Qwen3-30B-A3B": dict(
        model_type="qwen3_moe", hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        vocab_size=151936, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
        full_layers=48, tie_word_embeddings=False,
    ),
    "Mixtral-8x7B": dict(
        model_type="mixtral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=14336, full_layers=32, tie_word_embeddings=False,
    ),
}
TARGET_VARIANTS = ("varwidth-0%", "dims-50%-global", "dims-50%-uniform-vw")
REFERENCE = "varwidth-0%"  # the same experts module the variants run on: bounds and same-kernel speed-ups are against it
PREFILL_TARGET = "varwidth-0%"  # the only variant a prefill target reads
# Its group runs one prefill round more than --repeats where a dense prompt takes at most this long
# (every model here but Mixtral, whose prompt takes 6-7 s), else two fewer (see the docstring).
PREFILL_CHEAP_S = 3.0
# Batch-8 decode steps are cut to a third where one step reads at least this share of a layer's experts
# in expectation (Mixtral: 16 slots over 8 experts read ~90%; the others 40-66%): each such step reads
# nearly the whole layer, so a few steps still read more of it than the others' full count does.
B8_FULL_READ = 0.8
HEAD_STEPS = 4  # LM head steps timed (twice) per batch size
HEAD_TO_HEAD = ("dims-50%-global", "dims-50%-uniform-vw")  # both on moetrim's module, same rounds (the 5% target)
# Variants measured together, each group in the same rounds as dense (the machine holds one group at a time).
# The target group holds varwidth-0% too, so the target variants are measured against the same module side
# by side; "-vw" is uniform trimming run on moetrim's module (force_varwidth), the plain uniform variants are
# the stock transformers experts users of a standard checkpoint get.
# Replaced experts (LightMoE's replace and D²-MoE) at 50% of routed weights removed, against dense: the target
# is decode at least as fast as dense at batch 1 and 8, since what they store (and read) is smaller.
REPLACED_TARGETS = ("replace-50%", "d2-50%")
GROUPS = (("varwidth-0%", *HEAD_TO_HEAD), ("dims-50%-uniform", "dims-25%-uniform"), ("dims-25%-global", "dims-25%-uniform-vw"),
          ("experts-25%", "experts-50%"), REPLACED_TARGETS)
VARIANTS = ("dense", "varwidth-0%", "dims-25%-global", "dims-50%-global", "dims-25%-uniform-vw", "dims-50%-uniform-vw",
            "dims-25%-uniform", "dims-50%-uniform", "experts-25%", "experts-50%", *REPLACED_TARGETS)
REPLACE_RANK, REPLACE_MAX_GROUP = 16, 8
ROUND_TO: int | None = None  # set by --round-to


# Matrices larger than this many elements repeat one random block of it (an odd length, so rows of any
# width start at different places of the block): timing does not depend on the values, and drawing
# Mixtral's 1.6 G normal values took 25 of its 31 s build here.
FILL_BLOCK = (1 << 22) + 1


def fill_normal(p: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """p ~ N(0, std): drawn directly up to FILL_BLOCK elements, beyond that the drawn block tiled."""
    flat = p.view(-1)
    n = flat.numel()
    flat[: min(n, FILL_BLOCK)].normal_(0, std, generator=gen)
    done = min(n, FILL_BLOCK)
    while done < n:  # doubling copies of what is filled already
        k = min(done, n - done)
        flat[done : done + k].copy_(flat[:k])
        done += k


def build(spec: dict, layers: int, dtype: torch.dtype, device: str) -> nn.Module:
    """The model's shapes with random weights: matrices N(0, 0.02) (see FILL_BLOCK), norms 1, biases 0
    (filled directly: the library's per-module init takes four times as long at these sizes)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    kw = {k: v for k, v in spec.items() if k not in ("model_type", "full_layers")}
    cfg = AutoConfig.for_model(spec["model_type"], num_hidden_layers=layers, max_position_embeddings=4096, **kw)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                fill_normal(p, 0.02, gen)
    return model.eval()


def global_plan(model: nn.Module, ratio: float, spread: float, seed: int):
    """A global-allocation plan with per-expert widths drawn log-normally around the target."""
    plan = make_plan(model, None, granularity="dims", criterion="random", ratio=ratio, allocation="global", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    layers = find_moe_layers(model)
    width = layers[0].widths[0]
    n = sum(l.num_experts for l in layers)
    raw = torch.exp(torch.randn(n, generator=gen, dtype=torch.float64) * spread)
    target = (1 - ratio) * width * n
    w = raw * target / raw.sum()
    for _ in range(20):  # clip to [8, width] and renormalise
        w = w.clamp(8, width)
        w = w * target / w.sum()
    step = ROUND_TO or 1  # --round-to: widths in multiples (as `make_plan(round_to=...)` gives them)
    widths = (torch.round(w / step).long() * step).clamp(max(8, step), width).tolist()
    i = 0
    for lp in plan.layers:
        lp.kept_experts = list(range(lp.experts_before))
        lp.widths = widths[i : i + lp.experts_before]
        lp.kept_dims = [list(range(k)) for k in lp.widths]
        i += lp.experts_before
    per_dim = layers[0].params_per_dim()
    plan.params_after = sum(widths) * per_dim
    return plan


def replaced_layout(layer, ratio: float, method: str) -> tuple[list[int], list[list[int]], int]:
    """(kept, groups, rank) of a layer at `ratio` of its routed weights removed, priced as the replace plans
    price them: replace keeps the most experts the budget allows (at least top-k) and groups the rest, at
    most 8 a group, at rank 16; D²-MoE has one base and every expert a delta at the largest rank that fits.
    Which experts are kept does not matter for speed: random weights route about uniformly."""
    from moetrim.model.replaced import replaced_param_count
    from moetrim.plan.replace import d2_rank

    E, H, I, k = layer.num_experts, layer.hidden_size, layer.widths[0], layer.top_k
    budget = (1 - ratio) * E * 3 * H * I
    if method == "d2":
        return [], [list(range(E))], max(1, d2_rank(layer, ratio))  # the rank the plan gives
    for kept in range(E - 1, k - 1, -1):
        replaced = E - kept
        groups = -(-replaced // REPLACE_MAX_GROUP)
        if replaced_param_count(H, I, kept, groups, replaced, REPLACE_RANK) <= budget:
            members = list(range(kept, E))
            return list(range(kept)), [members[g::groups] for g in range(groups)], REPLACE_RANK
    raise ValueError(f"{ratio:.0%} is out of reach for replace at rank {REPLACE_RANK} with {E} experts")


def replaced_variant(dense: nn.Module, ratio: float, method: str, seed: int) -> tuple[nn.Module, float]:
    """`dense` with every MoE layer's experts replaced (random weights of the plan's shapes)."""
    from moetrim.model.replaced import ReplacedExperts, install_layer

    m = shared_copy(dense)
    gen = torch.Generator(device=next(dense.parameters()).device).manual_seed(seed)
    before = after = 0
    for layer in find_moe_layers(m):
        kept, groups, rank = replaced_layout(layer, ratio, method)
        p = next(layer.experts.parameters())
        new = ReplacedExperts(layer.num_experts, layer.hidden_size, layer.widths[0], kept, groups, rank, layer.activation(),
                              dtype=p.dtype, device=p.device)
        with torch.no_grad():
            for q in new.parameters():
                fill_normal(q, 0.02, gen)
        before += layer.routed_params()
        after += new.param_count()
        install_layer(m, layer, new)
    return m.eval(), 1 - after / before


def make_variant(dense: nn.Module, name: str, spread: float, seed: int) -> tuple[nn.Module, float]:
    if name == "dense":
        return dense, 0.0
    if name in REPLACED_TARGETS:
        kind, pct = name.split("-")
        return replaced_variant(dense, int(pct.rstrip("%")) / 100, kind, seed)
    m = shared_copy(dense)
    if name == "varwidth-0%":
        plan = make_plan(m, None, granularity="dims", criterion="random", ratio=0.0, allocation="global", seed=seed)
        apply_plan(m, plan, force_varwidth=True)
        return m, 0.0
    kind, pct, *alloc = name.split("-")
    ratio = int(pct.rstrip("%")) / 100
    if kind == "experts":
        plan = make_plan(m, None, granularity="experts", criterion="random", ratio=ratio, allocation="layer", seed=seed)
    elif alloc == ["global"]:
        plan = global_plan(m, ratio, spread, seed)
    else:
        plan = make_plan(m, None, granularity="dims", criterion="random", ratio=ratio, allocation="uniform", seed=seed)
    apply_plan(m, plan, force_varwidth=alloc[1:] == ["vw"])
    return m, plan.removed_fraction


class PartTimer:
    """Wall time inside decoder layers and inside routed experts (forward hooks)."""

    def __init__(self, model: nn.Module, device: str):
        from moetrim.model.view import decoder_layers

        self.device = device
        self.layer_t = 0.0
        self.expert_t = 0.0
        self.handles = []
        moe = find_moe_layers(model)
        self.hits = [torch.zeros(l.num_experts, dtype=torch.float64) for l in moe]  # token-slots per expert
        self.calls_hit = [torch.zeros(l.num_experts, dtype=torch.float64) for l in moe]  # calls touching it
        for layer in decoder_layers(model):
            self._watch(layer, "layer_t")
        for i, l in enumerate(moe):
            self.handles.append(l.experts.register_forward_pre_hook(self._counter(i)))  # before the clock starts
            self._watch(l.experts, "expert_t")

    def _counter(self, i: int):
        def pre(mod, args):
            counts = torch.bincount(args[1].reshape(-1).cpu(), minlength=self.hits[i].numel()).double()
            self.hits[i] += counts
            self.calls_hit[i] += (counts > 0).double()

        return pre

    def _watch(self, module: nn.Module, field: str) -> None:
        start = {}

        def pre(mod, args):
            if self.device == "cuda":
                torch.cuda.synchronize()
            start["t"] = time.perf_counter()

        def post(mod, args, out):
            if self.device == "cuda":
                torch.cuda.synchronize()
            setattr(self, field, getattr(self, field) + time.perf_counter() - start["t"])

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def reset(self) -> None:
        self.layer_t = self.expert_t = 0.0
        for t in (*self.hits, *self.calls_hit):
            t.zero_()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def sample(timer: PartTimer, total: float) -> dict:
    """One measurement: total seconds, the parts inside layers / experts, and what the experts were hit by."""
    return {"total": total, "layers": timer.layer_t, "experts": timer.expert_t,
            "hits": [h.clone() for h in timer.hits], "calls_hit": [c.clone() for c in timer.calls_hit]}


def timed(model: nn.Module, fn, device: str) -> dict:
    """One call of fn(model, timer) -> seconds, with its parts."""
    timer = PartTimer(model, device)
    try:
        return sample(timer, fn(model, timer))
    finally:
        timer.remove()


def full_depth(t: dict, layers: int, full_layers: int) -> dict:
    outside = max(t["total"] - t["layers"], 0.0)
    per_layer = t["layers"] / layers
    total = outside + full_layers * per_layer
    return {"total": total, "experts_share": full_layers * (t["experts"] / layers) / total if total else 0.0}


def rotated(k: int, shift: int) -> list[int]:
    """0..k-1 starting at shift % k: over k calls every model runs first, second, ... once."""
    return [(shift + j) % k for j in range(k)]


def round_ratios(rounds: list[list[dict]], a: int, b: int, layers: int, full_layers: int, depth: bool = True) -> list[float]:
    """Per round, model a's time over model b's (at full depth, or as measured): the speed-up of b over a."""
    out = []
    for r in rounds:
        ta, tb = (full_depth(r[i], layers, full_layers)["total"] if depth else r[i]["total"] for i in (a, b))
        out.append(round(ta / tb, 4))
    return out


def b8_steps(spec: dict, steps: int) -> int:
    """Batch-8 decode steps for this model: `steps`, a third where a step reads nearly every expert."""
    experts = spec.get("num_experts") or spec["num_local_experts"]
    share = 1 - (1 - spec["num_experts_per_tok"] / experts) ** 8  # experts hit by 8 tokens, each picking k of E
    return max(2, steps // 3) if share >= B8_FULL_READ else steps


def fastest(samples: list[dict]) -> dict:
    """The fastest sample's timings (for the experts' share of time); expert hit counts summed over the samples."""
    out = dict(min(samples, key=lambda s: s["total"]))
    for k in ("hits", "calls_hit"):
        out[k] = [sum(s[k][i] for s in samples) for i in range(len(samples[0][k]))]
    return out


def touched_width(model: nn.Module, counts: list[torch.Tensor]) -> float:
    """Expert width summed over what the workload touched, each expert weighted by ``counts``."""
    return sum(float((c * torch.tensor(layer.widths, dtype=torch.float64)).sum())
               for layer, c in zip(find_moe_layers(model), counts))


def run_model(name: str, spec: dict, args) -> list[dict]:
    layers = args.layers or (1 if args.quick else 2)
    if name.startswith("Mixtral") and not args.layers:
        layers = 1
    t0 = time.perf_counter()
    dense = build(spec, layers, args.dtype, args.device)
    ids = torch.randint(0, spec["vocab_size"], (8, args.prompt_len), generator=torch.Generator().manual_seed(1)).to(args.device)
    log(f"{name}: built {layers} layer(s) in {time.perf_counter() - t0:.0f}s; {weight_bytes(dense) / 2**30:.2f} GiB")
    impls = ["grouped_mm", "eager"] + ([] if args.quick else ["batched_mm"])
    if args.device == "cuda":
        impls = ["grouped_mm", "eager", "batched_mm"]
    cuda = args.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def prefill(m, timer):
        return prefill_seconds(m, ids[:1])

    # Decode runs the model body on given next tokens (the same for every variant in a round, so routing
    # is identical) and adds the LM head's one-token time, measured once: the head is the same module in
    # every variant, and at one built layer its vocabulary-sized read would otherwise dominate the run.
    def head_seconds(b: int, steps: int) -> float:
        """The head's time for `steps` steps: the faster of two runs of HEAD_STEPS steps, scaled (every
        step does the same work on the same weights)."""
        h = torch.randn(b, 1, spec["hidden_size"], dtype=args.dtype, device=args.device)
        norm = getattr(dense, dense.base_model_prefix).norm
        times = []
        with torch.inference_mode():
            for _ in range(2):
                t = time.perf_counter()
                for _ in range(HEAD_STEPS):
                    dense.lm_head(norm(h)).argmax(-1)
                sync()
                times.append(time.perf_counter() - t)
        return min(times) * steps / HEAD_STEPS

    steps = {1: args.steps, 8: b8_steps(spec, args.steps_b8)}
    head = {b: head_seconds(b, steps[b]) for b in (1, 8)}
    log(f"  LM head + final norm: b1 {steps[1]} steps {head[1]:.3f}s, b8 {steps[8]} steps {head[8]:.3f}s (added to every decode total)")

    prompts: dict[int, object] = {}  # id(model) -> KV cache of the 16-token prompt, all 8 sequences

    def prompt_cache(m: nn.Module, b: int, row: int = 0):
        """A fresh copy of the 16-token prompt's KV cache for sequences row..row+b-1: built once per model
        for all 8 (not timed; at these sizes the prompt pass costs as much as the decode steps), copied
        and cut to those sequences for every measurement."""
        if id(m) not in prompts:
            with torch.inference_mode():
                prompts[id(m)] = cache_of(body_of(m)(input_ids=ids[:, :16], use_cache=True))
        cache = copy.deepcopy(prompts[id(m)])
        if b < ids.shape[0]:
            cache.batch_select_indices(torch.arange(row, row + b, device=ids.device))
        return cache

    def decode_lockstep(models: list[nn.Module], b: int, n: int, shift: int = 0, with_head: bool = True,
                        first: int = 0, row: int = 0) -> list[dict]:
        """n decode steps of every model in lockstep: step i runs on each model in turn, the order rotated
        every step, so a slow phase of this shared machine (they last longer than a step) hits all alike.
        Step i feeds sequences row..row+b-1 their prompt token `first + i` after position 16 (wrapping),
        the same for every model."""
        timers = [PartTimer(m, args.device) for m in models]
        try:
            bodies = [body_of(m) for m in models]
            caches = [prompt_cache(m, b, row) for m in models]
            totals = [0.0] * len(models)
            for t in timers:
                t.reset()
            with torch.inference_mode():
                for i in range(n):
                    pos = 16 + (first + i) % (ids.shape[1] - 16)
                    step = ids[row : row + b, pos : pos + 1]
                    for j in rotated(len(models), i + shift):
                        t = time.perf_counter()
                        caches[j] = cache_of(bodies[j](input_ids=step, use_cache=True, **cache_kwargs(bodies[j], caches[j])))
                        sync()
                        totals[j] += time.perf_counter() - t
            head_time = head[b] * n / steps[b] if with_head else 0.0
            return [sample(timer, total + head_time) for timer, total in zip(timers, totals)]
        finally:
            for t in timers:
                t.remove()

    batch = {"decode": 1, "decode_b8": 8}
    def tokens_of(steps_of: dict) -> dict:
        """Tokens one measurement of each regime processes, at these decode steps."""
        return {"prefill": args.prompt_len, "decode": steps_of[1], "decode_b8": 8 * steps_of[8]}

    tokens = tokens_of(steps)
    half_steps = {b: max(2, n // 2) for b, n in steps.items()}  # the pick's and the groups no target reads

    def warm(m: nn.Module, regime: str, full: bool = False) -> None:
        """The same code paths on less work (a short prompt, one decode step), or with `full` the whole
        prompt (the first pass at a size allocates buffers later passes reuse); results discarded."""
        if regime == "prefill":
            prefill_seconds(m, ids[:1] if full else ids[:1, :64])
        else:
            decode_lockstep([m], batch[regime], 1, with_head=False)

    def rounds_of(models: list[nn.Module], regime: str, n: int, steps_of: dict | None = None) -> list[list[dict]]:
        """n rounds; each round measures every model once: prefill one model after another, decode in lockstep
        (both in an order rotated every round)."""
        out = []
        for r in range(n):
            if regime == "prefill":
                got = {}
                for j in rotated(len(models), r):
                    got[j] = timed(models[j], prefill, args.device)
                out.append([got[j] for j in range(len(models))])
            else:
                b = batch[regime]
                n_steps = (steps_of or steps)[b]
                # each round decodes tokens of its own (at batch 1 of another sequence: a sequence's tokens
                # prefer experts of their own), so the rounds together sample more of the routing
                out.append(decode_lockstep(models, b, n_steps, shift=r, first=r * n_steps, row=(r * b) % ids.shape[0]))
        return out

    rows = []
    # Dense: pick the fastest stock implementation per regime (one measured sample each, decode on half
    # the steps to save time: one sample is a rough pick either way, and what the rounds below measure
    # against is whichever implementation it picked).
    pick_tokens = tokens_of(half_steps)
    dense_impl: dict[str, str] = {}
    dense_seconds: dict[str, float] = {}
    for regime in tokens:
        t_pick = time.perf_counter()
        cands = [i for i in impls if not (regime == "prefill" and i == "batched_mm")]
        best = {}
        for i in cands:  # warm-up, then one sample each to pick the fastest (the rounds come below)
            dense.set_experts_implementation(i)
            warm(dense, regime)
            best[i] = rounds_of([dense], regime, 1, half_steps)[0][0]["total"]
        dense_impl[regime] = min(best, key=best.get)
        dense_seconds[regime] = best[dense_impl[regime]]
        log(f"  dense {regime}: " + ", ".join(f"{i} {pick_tokens[regime] / best[i]:.1f} tok/s" for i in cands) + f" -> {dense_impl[regime]} ({time.perf_counter() - t_pick:.0f}s)")
    dense.set_experts_implementation("grouped_mm")
    full = spec["full_layers"]
    dense_bytes = weight_bytes(dense)
    moe0 = find_moe_layers(dense)
    routed0 = sum(l.routed_params() for l in moe0)
    routed_bytes_full = full * sum(l.experts.down_proj.element_size() * l.routed_params() for l in moe0) / layers
    dense_full = _outside_bytes(dense) + full * (dense_bytes - _outside_bytes(dense)) / layers
    rows.append(_dense_row(name, layers, full, tokens, dense_impl))
    rows[-1]["decode_steps"], rows[-1]["decode_b8_steps"] = steps[1], steps[8]

    v0_ref: dict[str, dict] = {}  # per regime, from the group holding varwidth-0%: its experts' share and speed-up

    def measure_group(group: tuple[str, ...]) -> list[dict]:
        """The group's variants built together and measured in the same rounds as dense (and, in the target
        group, as varwidth-0%)."""
        t_group = time.perf_counter()
        built = [(v, *make_variant(dense, v, args.width_spread, args.seed)) for v in group]
        seconds = {"build": time.perf_counter() - t_group}
        models = [dense] + [m for _, m, _ in built]
        target = any(v in TARGET_VARIANTS + REPLACED_TARGETS for v in group)
        # prefill rounds cost the most (Mixtral: seconds each) and only varwidth-0% has a prefill target
        n_rounds = {"decode": args.repeats if target else max(1, args.repeats - 3)}
        n_rounds["decode_b8"] = n_rounds["decode"]
        cheap_prefill = PREFILL_TARGET in group and dense_seconds["prefill"] <= PREFILL_CHEAP_S
        if PREFILL_TARGET in group:
            n_rounds["prefill"] = args.repeats + 1 if cheap_prefill else max(2, args.repeats - 2)
        else:
            n_rounds["prefill"] = max(1, args.repeats - 3)
        group_steps = steps if target else half_steps  # no target reads them
        group_tokens = tokens_of(group_steps)
        group_rows = []
        for v, m, removed in built:
            row = {"model": name, "variant": v, "layers": layers, "full_layers": full, "removed_fraction": round(removed, 4),
                   "decode_steps": group_steps[1], "decode_b8_steps": group_steps[8]}
            # weight bytes at full depth by calculation: non-layer bytes + full_layers * per-layer bytes
            vb = weight_bytes(m)
            row["weight_bytes_ratio"] = (_outside_bytes(m) + full * (vb - _outside_bytes(m)) / layers) / dense_full
            row["weight_bytes_ratio_measured_depth"] = vb / dense_bytes
            # parameter arithmetic: removing a fraction r of routed-expert weights at full depth
            row["weight_bytes_ratio_arithmetic"] = 1 - removed * routed_bytes_full / dense_full
            row["routed_params_ratio"] = sum(l.routed_params() for l in find_moe_layers(m)) / routed0
            group_rows.append(row)
        for regime in tokens:
            for mm in models:
                if _is_stock(mm):
                    mm.set_experts_implementation(dense_impl[regime])
                if mm is not dense:  # (dense ran the whole prompt when its implementation was picked)
                    warm(mm, regime, full=cheap_prefill)
            t_regime = time.perf_counter()
            rounds = rounds_of(models, regime, n_rounds[regime], group_steps)
            seconds[regime] = time.perf_counter() - t_regime
            d = fastest([r[0] for r in rounds])
            fd = full_depth(d, layers, full)
            s = fd["experts_share"]
            key_c = "hits" if regime == "prefill" else "calls_hit"
            j0 = group.index(REFERENCE) + 1 if REFERENCE in group else None
            if j0 is not None:
                v0_ref[regime] = {"share": full_depth(fastest([r[j0] for r in rounds]), layers, full)["experts_share"],
                                  "speedup": statistics.median(round_ratios(rounds, 0, j0, layers, full))}
            for j, ((v, m, removed), row) in enumerate(zip(built, group_rows), start=1):
                vs = fastest([r[j] for r in rounds])
                # removed share of the routed weights the run touched, against dense on the same inputs
                # (replaced experts keep every expert's width: their saving is the removed fraction as stored)
                touched = removed if v in REPLACED_TARGETS else 1.0 - touched_width(m, vs[key_c]) / touched_width(dense, d[key_c])
                bound = 1.0 / ((1 - s) + s * (1 - touched))
                pairs = round_ratios(rounds, 0, j, layers, full)
                # the median of the rounds' own ratios: each round's two measurements ran side by side
                row[f"{regime}_speedup"] = statistics.median(pairs)
                row[f"{regime}_speedup_pairs"] = pairs
                row[f"{regime}_speedup_fastest"] = fd["total"] / full_depth(vs, layers, full)["total"]
                row[f"{regime}_speedup_measured_depth"] = statistics.median(round_ratios(rounds, 0, j, layers, full, depth=False))
                row[f"{regime}_bound"] = bound
                row[f"{regime}_bound_nominal"] = 1.0 / ((1 - s) + s * (1 - removed))
                row[f"{regime}_touched_removed_fraction"] = touched
                row[f"{regime}_vs_bound"] = row[f"{regime}_speedup"] / bound
                row[f"{regime}_experts_share"] = s
                row[f"{regime}_tokens_per_s_measured_depth"] = group_tokens[regime] / vs["total"]
                row[f"{regime}_dense_impl"] = dense_impl[regime]
                # Against varwidth-0%, the same module at full width: the bound takes its experts' share of time,
                # so a faster module cannot inflate measured/bound. Same rounds where it is in the group, else via
                # dense (this variant's median speed-up over dense / varwidth-0%'s, from the target group).
                ref = v0_ref.get(regime)
                if ref is not None and v != REFERENCE:
                    s0 = ref["share"]
                    if j0 is not None:
                        pairs0 = round_ratios(rounds, j0, j, layers, full)
                        row[f"{regime}_vs_v0"], row[f"{regime}_vs_v0_pairs"], row[f"{regime}_vs_v0_how"] = statistics.median(pairs0), pairs0, "same rounds"
                    else:
                        row[f"{regime}_vs_v0"], row[f"{regime}_vs_v0_how"] = row[f"{regime}_speedup"] / ref["speedup"], "via dense"
                    row[f"{regime}_bound_v0"] = 1.0 / ((1 - s0) + s0 * (1 - touched))
                    row[f"{regime}_v0_experts_share"] = s0
                    row[f"{regime}_vs_bound_v0"] = row[f"{regime}_vs_v0"] / row[f"{regime}_bound_v0"]
            if set(HEAD_TO_HEAD) <= set(group) and regime != "prefill":  # global against uniform, same module and rounds
                jg, ju = (group.index(v) + 1 for v in HEAD_TO_HEAD)
                pairs = round_ratios(rounds, ju, jg, layers, full)
                g_row = group_rows[jg - 1]
                g_row[f"{regime}_vs_uniform_direct"] = statistics.median(pairs)
                g_row[f"{regime}_vs_uniform_direct_pairs"] = pairs
        log(f"  group {', '.join(group)}: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
            + f" (total {time.perf_counter() - t_group:.0f}s)")
        for row in group_rows:
            log(f"  {row['variant']:18s} bytes {row['weight_bytes_ratio']:.3f}  prefill x{row['prefill_speedup']:.2f} (bound {row['prefill_bound']:.2f})"
                f"  decode x{row['decode_speedup']:.2f} (bound {row['decode_bound']:.2f})  decode b8 x{row['decode_b8_speedup']:.2f} (bound {row['decode_b8_bound']:.2f})")
        if set(HEAD_TO_HEAD) <= set(group):
            g = group_rows[group.index(HEAD_TO_HEAD[0])]
            log(f"  {HEAD_TO_HEAD[0]} / {HEAD_TO_HEAD[1]} (same rounds): decode b1 x{g['decode_vs_uniform_direct']:.2f}, "
                f"b8 x{g['decode_b8_vs_uniform_direct']:.2f}")
        for mm in models[1:]:
            prompts.pop(id(mm), None)
        dense.set_experts_implementation("grouped_mm")
        return group_rows

    wanted = set(args.variants.split(",")) if args.variants else None
    for group in GROUPS:
        if wanted is not None and not wanted & set(group):
            continue
        rows += measure_group(group)
        gc.collect()  # the group's variants are gone with measure_group's frame
    del dense
    gc.collect()
    return sorted(rows, key=lambda r: VARIANTS.index(r["variant"]))


def _dense_row(name: str, layers: int, full: int, tokens: dict, dense_impl: dict) -> dict:
    """Dense against itself: every ratio 1 by definition."""
    row = {"model": name, "variant": "dense", "layers": layers, "full_layers": full, "removed_fraction": 0.0,
           "weight_bytes_ratio": 1.0, "weight_bytes_ratio_measured_depth": 1.0, "weight_bytes_ratio_arithmetic": 1.0,
           "routed_params_ratio": 1.0}
    for regime in tokens:
        for k in ("speedup", "speedup_fastest", "speedup_measured_depth", "bound", "bound_nominal", "vs_bound"):
            row[f"{regime}_{k}"] = 1.0
        row[f"{regime}_speedup_pairs"] = []
        row[f"{regime}_touched_removed_fraction"] = 0.0
        row[f"{regime}_dense_impl"] = dense_impl[regime]
    return row


def b8_steps_text(rows: list[dict], meta: dict) -> str:
    """'6' or '6 (Mixtral-8x7B 3)': the batch-8 steps, with the models that ran fewer."""
    default = meta.get("decode_steps_b8", meta["decode_steps"])
    fewer = {r["model"]: r["decode_b8_steps"] for r in rows if r["variant"] == "dense" and r.get("decode_b8_steps", default) != default}
    return f"{default}" + (f" ({', '.join(f'{m} {n}' for m, n in fewer.items())}: each step reads nearly every expert)" if fewer else "")


def body_of(m: nn.Module) -> nn.Module:
    """The decoder stack without the LM head."""
    return getattr(m, m.base_model_prefix)


def _is_stock(m: nn.Module) -> bool:
    return not any(getattr(l.experts, "is_moetrim_varwidth", False) for l in find_moe_layers(m))


def _outside_bytes(model: nn.Module) -> int:
    """Weight bytes outside the decoder layers (embeddings, final norm, LM head)."""
    from moetrim.model.view import decoder_layers

    inside = {id(p) for p in decoder_layers(model).parameters()}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in inside and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def markdown(rows: list[dict], title: str) -> str:
    def vs_v0(r: dict, k: str) -> str:
        if f"{k}_vs_v0" not in r:
            return "-"
        via = "" if r.get(f"{k}_vs_v0_how") == "same rounds" else "*"
        return f"x{r[f'{k}_vs_v0']:.2f}{via} ({r[f'{k}_bound_v0']:.2f}, {r[f'{k}_vs_bound_v0']:.2f})"

    head = (f"### {title}\n\n| model | variant | weight bytes | prefill vs dense | decode b1 vs dense | b1 vs varwidth-0% "
            "(bound, measured/bound) | decode b8 vs dense | b8 vs varwidth-0% (bound, measured/bound) |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        body += (f"| {r['model']} | {r['variant']} | {r['weight_bytes_ratio']:.3f} | x{r['prefill_speedup']:.2f} | "
                 f"x{r['decode_speedup']:.2f} | {vs_v0(r, 'decode')} | x{r['decode_b8_speedup']:.2f} | {vs_v0(r, 'decode_b8')} |\n")
    return head + body


def targets(rows: list[dict]) -> dict:
    """The targets read off the rows, one entry per model: every speed target compares moetrim's module
    with itself (variants against varwidth-0%, global against uniform run on the same module)."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["variant"]: r for r in rows if r["model"] == model}
        g, u, stock, v0 = (by.get(v) for v in ("dims-50%-global", "dims-50%-uniform-vw", "dims-50%-uniform", REFERENCE))
        t = {}
        if g:
            t["weight_bytes_vs_arithmetic"] = g["weight_bytes_ratio"] / g["weight_bytes_ratio_arithmetic"]
            for k in ("decode", "decode_b8"):
                t[f"{k}_vs_bound_v0"] = g.get(f"{k}_vs_bound_v0", float("nan"))
                t[f"{k}_global_vs_uniform_vw_direct"] = g.get(f"{k}_vs_uniform_direct", float("nan"))
                t[f"{k}_global_vs_dense"] = g[f"{k}_speedup"]
                if u:
                    t[f"{k}_uniform_vw_vs_bound_v0"] = u.get(f"{k}_vs_bound_v0", float("nan"))
                if stock:
                    t[f"{k}_uniform_stock_vs_dense"] = stock[f"{k}_speedup"]
        if v0:
            t["varwidth_0_slowest_vs_dense"] = min(v0[f"{k}_speedup"] for k in ("prefill", "decode", "decode_b8"))
        for v in REPLACED_TARGETS:
            if v in by:
                for k in ("decode", "decode_b8"):
                    t[f"{k}_{v}_vs_dense"] = by[v][f"{k}_speedup"]
                    t[f"{k}_{v}_vs_bound"] = by[v][f"{k}_vs_bound"]
        for k, label in (("decode", "met_b1"), ("decode_b8", "met_b8")):
            t[label] = bool(
                (not g or (abs(t["weight_bytes_vs_arithmetic"] - 1) <= 0.01 and t[f"{k}_vs_bound_v0"] >= 0.9
                           and t[f"{k}_global_vs_uniform_vw_direct"] >= 0.95))
                and (not v0 or t["varwidth_0_slowest_vs_dense"] >= 0.97)
                and all(t[f"{k}_{v}_vs_dense"] >= 1.0 for v in REPLACED_TARGETS if f"{k}_{v}_vs_dense" in t)
            )
        t["met"] = t["met_b1"] and t["met_b8"]
        out[model] = t
    return out


def missed(checks: dict) -> list[str]:
    """One line per model that misses a target, naming each missed target and its figure."""
    nan = float("nan")
    lines = []
    for model, t in checks.items():
        why = []
        if "weight_bytes_vs_arithmetic" in t and abs(t["weight_bytes_vs_arithmetic"] - 1) > 0.01:
            why.append(f"weight bytes / arithmetic {t['weight_bytes_vs_arithmetic']:.4f} (target within 1%)")
        for k, label in (("decode", "b1"), ("decode_b8", "b8")):
            if f"{k}_vs_bound_v0" in t and not t[f"{k}_vs_bound_v0"] >= 0.9:
                why.append(f"{label} global / bound {t.get(f'{k}_vs_bound_v0', nan):.2f} (target >= 0.9)")
            if f"{k}_global_vs_uniform_vw_direct" in t and not t[f"{k}_global_vs_uniform_vw_direct"] >= 0.95:
                why.append(f"{label} global / uniform-vw {t[f'{k}_global_vs_uniform_vw_direct']:.2f} (target >= 0.95)")
        for v in REPLACED_TARGETS:
            for k, label in (("decode", "b1"), ("decode_b8", "b8")):
                if f"{k}_{v}_vs_dense" in t and not t[f"{k}_{v}_vs_dense"] >= 1.0:
                    why.append(f"{label} {v} / dense {t[f'{k}_{v}_vs_dense']:.2f} (target >= 1.0)")
        if "varwidth_0_slowest_vs_dense" in t and not t["varwidth_0_slowest_vs_dense"] >= 0.97:
            why.append(f"varwidth-0% slowest regime / dense {t['varwidth_0_slowest_vs_dense']:.2f} (target >= 0.97)")
        if why or not t.get("met", True):
            lines.append(f"{model}: " + ("; ".join(why) or "a target is missed"))
    return lines


def write(out: Path, meta: dict, rows: list[dict], update_readme: bool) -> list[str]:
    """Targets, JSON (atomically) and the Markdown table; the README section only for the default output.
    Returns the targets missed (`missed`)."""
    checks = targets(rows)
    stock = {r["model"]: {k[: -len("_dense_impl")]: v for k, v in r.items() if k.endswith("_dense_impl")}
             for r in rows if r["variant"] == "dense"}  # the fastest stock implementation per regime, measured
    write_json(out, {"meta": meta, "targets": checks, "rows": rows}, experts_implementation=stock)
    quick = meta["quick"]
    table = markdown(rows, f"speed ({meta['device']}, {meta['dtype']}, {'quick' if quick else 'full'})")
    table += (f"\n`python benchmarks/speed.py{' --quick' if quick else ''}` ({meta['seconds']:.0f} s): layers built per model: "
              + ", ".join(sorted({f"{r['model']} {r['layers']} of {r['full_layers']}" for r in rows}))
              + f"; {meta['threads']} threads; decode {meta['decode_steps']} steps at batch 1 and "
              + b8_steps_text(rows, meta) + " at batch 8 (half as many, in one round, in the groups no target reads); speed-ups and "
              "weight ratios extrapolated to full depth from per-part timings. `-vw`: uniform trimming run on moetrim's "
              "variable-width module; plain `uniform`: the standard checkpoint on stock transformers experts, what its users get. "
              "vs varwidth-0%: against moetrim's module at full width; bound = Amdahl limit from varwidth-0%'s share of time in "
              "routed experts and the removed fraction of the routed weights the run touched, so both sides of measured/bound run "
              "the same kernel. `*`: no varwidth-0% in that group's rounds, so the variant's speed-up over dense divided by "
              "varwidth-0%'s (from the target group).\n")
    table += ("\nTargets (dims-50%-global): weight bytes within 1% of arithmetic; decode >= 0.9 of the varwidth-0% bound, and "
              ">= 0.95 of uniform run on the same module (dims-50%-uniform-vw, same rounds), at batch 1 and batch 8; "
              "varwidth-0% >= 0.97 of dense in every regime. Speed-ups are medians of per-round ratios, each round measuring "
              "a group side by side (decode in lockstep, one step each in turn). The last two columns are what users of each "
              "checkpoint get over dense: global on moetrim's module, uniform on stock experts.\n\n"
              "| model | bytes / arithmetic | b1 / bound | b1 global / uniform-vw | b8 / bound | b8 global / uniform-vw | "
              "varwidth-0% slowest regime | met b1 | met b8 | b1, b8 over dense: global | b1, b8 over dense: stock uniform |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n")
    nan = float("nan")
    for model, t in checks.items():
        table += (f"| {model} | {t.get('weight_bytes_vs_arithmetic', nan):.4f} | {t.get('decode_vs_bound_v0', nan):.2f} | "
                  f"{t.get('decode_global_vs_uniform_vw_direct', nan):.2f} | {t.get('decode_b8_vs_bound_v0', nan):.2f} | "
                  f"{t.get('decode_b8_global_vs_uniform_vw_direct', nan):.2f} | {t.get('varwidth_0_slowest_vs_dense', nan):.2f} | "
                  f"{'yes' if t['met_b1'] else 'no'} | {'yes' if t['met_b8'] else 'no'} | "
                  f"x{t.get('decode_global_vs_dense', nan):.2f}, x{t.get('decode_b8_global_vs_dense', nan):.2f} | "
                  f"x{t.get('decode_uniform_stock_vs_dense', nan):.2f}, x{t.get('decode_b8_uniform_stock_vs_dense', nan):.2f} |\n")
    replaced = [r for r in rows if r["variant"] in REPLACED_TARGETS]
    if replaced:
        table += ("\nReplaced experts (random weights of the plan's shapes: replace keeps the most experts the budget allows "
                  f"and groups the rest, at most {REPLACE_MAX_GROUP} a group, at rank {REPLACE_RANK}; D²-MoE one base per layer "
                  "and a delta per expert at the largest rank that fits). Target: decode >= 1.0x dense at batch 1 and 8. "
                  "bound = the Amdahl limit from the stored fraction removed.\n\n"
                  "| model | variant | removed | weight bytes | decode b1 vs dense (/ bound) | decode b8 vs dense (/ bound) | prefill vs dense |\n"
                  "|---|---|---|---|---|---|---|\n")
        for r in replaced:
            table += (f"| {r['model']} | {r['variant']} | {r['removed_fraction']:.1%} | {r['weight_bytes_ratio']:.3f} | "
                      f"x{r['decode_speedup']:.2f} ({r['decode_vs_bound']:.2f}) | x{r['decode_b8_speedup']:.2f} "
                      f"({r['decode_b8_vs_bound']:.2f}) | x{r['prefill_speedup']:.2f} |\n")
    print(table)
    if update_readme:  # experiments written elsewhere leave the README alone
        update_section("speed-gpu" if meta["device"] != "cpu" else "speed", table)
    return missed(checks)


def fail_on(misses: list[str], no_fail: bool) -> int:
    """Exit status 1 with the missed targets on stderr, unless --no-fail; 0 when every target is met."""
    if not misses:
        return 0
    print("error: speed targets missed (results written all the same):\n  " + "\n  ".join(misses)
          + ("\n(--no-fail: exit status 0)" if no_fail else ""), file=sys.stderr)
    return 0 if no_fail else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 decoder layer per model, fewer repeats")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers built per model (default 1 quick, 2 full; Mixtral 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None, help="decode steps per measurement at batch 1 (default 8 quick, 32 full)")
    ap.add_argument("--steps-b8", type=int, default=None, help="decode steps per measurement at batch 8 (default 6 quick, 16 full; a third where one step reads nearly every expert)")
    ap.add_argument("--repeats", type=int, default=None, help="decode rounds per group for the groups the targets read (default 4 quick, 6 full; varwidth-0%% prefill one more where a dense prompt takes <= PREFILL_CHEAP_S, else two fewer; other groups 3 fewer of each, at least 1)")
    ap.add_argument("--width-spread", type=float, default=0.5, help="log-normal sigma of global-variant widths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--round-to", type=int, default=None, help="global variants' widths in multiples of this (few distinct "
                    "widths: equal-width runs the module groups)")
    ap.add_argument("--variants", default=None, help="measure only the groups holding these variants (comma-separated; "
                    "e.g. replace-50%%); the README is left alone")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report-only", action="store_true", help="measure nothing: recompute targets and tables from the JSON")
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even when a target is missed (they are still listed)")
    args = ap.parse_args(argv)
    out = args.out or HERE / "results" / ("speed-gpu.json" if args.device.startswith("cuda") else "speed.json")
    if args.report_only:
        try:
            data = json.loads(out.read_text())
            meta, rows = data["meta"], data["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: cannot read results from {out} ({type(e).__name__}); run the benchmark first", file=sys.stderr)
            return 2
        return fail_on(write(out, meta, rows, update_readme=args.out is None), args.no_fail)
    if args.round_to is not None and args.round_to < 1:
        print(f"error: --round-to must be a width of at least 1, got {args.round_to}", file=sys.stderr)
        return 2
    if args.variants and args.out is None:
        print("error: --variants measures part of the run: give --out so the committed results stay whole", file=sys.stderr)
        return 2
    global ROUND_TO
    ROUND_TO = args.round_to
    args.dtype = getattr(torch, args.dtype)
    args.steps = args.steps or (8 if args.quick else 32)
    args.steps_b8 = args.steps_b8 or (6 if args.quick else 16)
    args.repeats = args.repeats or (4 if args.quick else 6)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    need = 16 + max(args.steps, args.steps_b8, 64 - 16)  # decode feeds prompt tokens after a 16-token prompt
    if args.prompt_len < need:
        print(f"error: --prompt-len must be at least {need} (16 + decode steps, and 64 for the warm-up), got {args.prompt_len}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.models.split(",")]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"error: unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = []
    for n in names:
        rows += run_model(n, MODELS[n], args)
    meta = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "dtype": str(args.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "prompt_len": args.prompt_len,
        "decode_steps": args.steps,
        "decode_steps_b8": args.steps_b8,
        "repeats": args.repeats,
        "width_spread": args.width_spread,
        "round_to": args.round_to,
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "note": "speed-ups and weight ratios extrapolated to full depth from per-part timings; *_measured_depth at the built depth",
    }
    misses = write(out, meta, rows, update_readme=args.out is None)
    print(f"wrote {out} in {meta['seconds']:.0f}s", file=sys.stderr)
    return fail_on(misses, args.no_fail)


if __name__ == "__main__":
    sys.exit(main())
