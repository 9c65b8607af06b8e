"""The variable-width experts module against the stock `transformers` experts on the same layer.

One routed-experts layer per model at its real shape (random weights), uncompressed: the stock
module under each experts implementation `transformers` offers, and moetrim's
`VariableWidthExperts` at full width over the very same weight tensors (at 0% its packed layout is
the fused one byte for byte). Nothing else of the model runs, so this isolates what the module
itself costs. Regimes:

    decode_b1   1 token;  16 calls, each with a different routing
    decode_b8   8 tokens; 16 calls, each with a different routing
    prefill     512 tokens, one call
    train       256 tokens, forward + backward with gradients for the input, the routing weights and
                every expert weight (what fine-tuning does)

Decode calls rotate through different routings so that the experts they read are not all still in
the last-level cache (480 MiB here, enough to hold a few experts of any of these models) from the
call before; a real model reads other layers in between. Sides are measured in rounds, one sample
each. In a decode round the sides run interleaved call by call (every side once per call, the order
rotated every call, each side on another routing; `interleaved`), so a slow phase of the machine
hits all sides alike; prefill and training rounds run one call per side, the order reversed every
round. The fastest stock implementation is the one with the fastest
sample; `ratio` is its time over ours (>= 1: ours is at least as fast; target >= 0.97), estimated
according to the noise of the regime (`estimator`; both estimates are in the JSON):

- inference (`median_of_rounds`): the median over rounds of the two sides' ratio in the same round.
  Samples of identical work a few seconds apart differ by up to 25% on this shared machine, in
  phases that last longer than a round, so a ratio of single fastest samples moves with which side
  caught a quiet moment.
- training (`fastest`): each side's fastest sample. Each call faults in fresh weight-sized
  gradients (1.5 GiB at OLMoE's layer), and now and then a call stalls by up to one whole step's
  time, on either side (seen on both). The stall is not visible from inside this machine: no
  compaction stalls and no huge-page fallbacks in /proc/vmstat over a run. Rounds' ratios then split
  into two clusters, near 1 and near 0.5 or 2, and their median falls on whichever cluster holds
  more rounds. The fastest sample is the step without a stall.

Every sample is in the JSON (`samples`), with every round's ratio (`ratio_pairs`).

    python benchmarks/experts_module.py --quick      # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

# Large buffers (a training step allocates weight-sized gradients) come from 2 MiB pages: with 4 KiB
# pages the kernel's cost of faulting them in varied 2x between runs here and hid the modules' own
# cost. Both sides run under the same setting; read by torch at its first large allocation.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import update_section, write_json  # noqa: E402
from speed import MODELS  # noqa: E402  (the same real shapes)

TOKENS = {"decode_b1": 1, "decode_b8": 8, "prefill": 512, "train": 256}
ROUTINGS = {"decode_b1": 16, "decode_b8": 16, "prefill": 1, "train": 1}
# What `ratio` reads (see the module docstring): inference samples drift with slow phases of the machine
# that hit both sides of a round, so the median of the rounds' ratios; a training sample is the work plus,
# now and then, a stall of up to a whole step's time on either side, so each side's fastest sample.
ESTIMATOR = {"decode_b1": "median_of_rounds", "decode_b8": "median_of_rounds", "prefill": "median_of_rounds",
             "train": "fastest"}


def stock_experts(spec: dict, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """The family's own experts module for one layer at the real shape, weights N(0, 0.02)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from moetrim.model.view import find_moe_layers

    kw = {k: v for k, v in spec.items() if k not in ("model_type", "full_layers")}
    cfg = AutoConfig.for_model(spec["model_type"], num_hidden_layers=1, **kw)
    with torch.device("meta"):
        cls = type(find_moe_layers(AutoModelForCausalLM.from_config(cfg))[0].experts)
    with no_init_weights():
        experts = cls(cfg).to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.02, generator=gen)
    return experts, cfg


def ours(experts: torch.nn.Module) -> torch.nn.Module:
    """`VariableWidthExperts` at full width over the very tensors the stock module holds.

    At 0% the packed layout is the fused one byte for byte (expert e's gate rows, then its up rows;
    its down projection as [H, I]), so both sides read the same memory: where the kernel happened to
    place two copies of the weights moved a side's products by 2-3% here, and which side won that
    draw decided cells near the target. Checked expert by expert against the canonical views.
    """
    from moetrim.model.varwidth import VariableWidthExperts
    from moetrim.model.view import make_activation, stock_expert_weights

    ref = stock_expert_weights(experts, 0)
    width, hidden = ref.up.shape
    mod = VariableWidthExperts([width] * experts.num_experts, hidden, make_activation(experts), gated=True,
                               has_bias=False, dtype=ref.up.dtype, device="meta")
    mod.gate_up = torch.nn.Parameter(experts.gate_up_proj.detach().view(-1, hidden))
    mod.down_blocks = torch.nn.Parameter(experts.down_proj.detach().view(-1))
    for e in range(experts.num_experts):
        a, b = mod.expert_weights(e), stock_expert_weights(experts, e)
        if not all(x.data_ptr() == y.data_ptr() and x.stride() == y.stride() for x, y in ((a.gate, b.gate), (a.up, b.up), (a.down, b.down))):
            raise SystemExit(f"{type(experts).__name__}: the packed layout differs from the fused one; cannot share the weights")
    return mod


def workload(cfg, regime: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n, k = TOKENS[regime], cfg.num_experts_per_tok
    experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    x = torch.randn(n, cfg.hidden_size, generator=gen)
    routings = [torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(n)]) for _ in range(ROUTINGS[regime])]
    weights = torch.rand(n, k, generator=gen).softmax(-1)
    return x, routings, weights


def call(module, regime: str, x, routings, weights) -> float:
    """Seconds for one measurement of `regime`."""
    if regime == "train":
        xg, wg = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        t = time.perf_counter()
        out = module(xg, routings[0], wg)
        out.backward(torch.ones_like(out))
        seconds = time.perf_counter() - t
        # Gradients are dropped before the other side runs: two sides' weight-sized gradients alive at
        # once (22 GiB for Mixtral's layer with both modules' weights) put this 24 GiB machine under
        # memory pressure and made the timings depend on which side ran first.
        for p in module.parameters():
            p.grad = None
        return seconds
    with torch.inference_mode():
        t = time.perf_counter()
        for r in routings:
            module(x, r, weights)
        return time.perf_counter() - t


def interleaved(stock, mine, impls: list[str], x, routings, weights, shift: int) -> dict[str, float]:
    """One decode sample per side, the sides interleaved call by call: call i runs every side once, in an
    order rotated every call, side j on routing i + j (so no call re-reads the experts the call just
    before it read: both sides read the same weight tensors). A slow phase of the machine lasts longer
    than a call, so it hits every side alike; each side still runs every routing once."""
    names = [*impls, "moetrim"]
    seconds = dict.fromkeys(names, 0.0)
    with torch.inference_mode():
        for i in range(len(routings)):
            for j in ((shift + i + o) % len(names) for o in range(len(names))):
                module = mine if names[j] == "moetrim" else stock
                if module is stock:
                    stock.config._experts_implementation = names[j]
                r = routings[(i + j) % len(routings)]
                t = time.perf_counter()
                module(x, r, weights)
                seconds[names[j]] += time.perf_counter() - t
    return seconds


def run_model(name: str, args) -> list[dict]:
    t0 = time.perf_counter()
    stock, cfg = stock_experts(MODELS[name], args.dtype)
    mine = ours(stock)
    log(f"{name}: built in {time.perf_counter() - t0:.0f}s")
    rows = []
    for regime in args.regimes:
        x, routings, weights = workload(cfg, regime, args.seed)
        x, weights = x.to(args.dtype), weights.to(args.dtype)
        impls = ["grouped_mm", "eager"] + (["batched_mm"] if regime.startswith("decode") and not args.quick else [])
        if regime == "train" and args.quick:
            impls = ["grouped_mm"]  # eager's backward makes a weight-sized zero tensor per expert: ~45 s a step
        stock.train(regime == "train")
        mine.train(regime == "train")

        def stock_fn(impl):
            def fn():
                stock.config._experts_implementation = impl
                return call(stock, regime, x, routings, weights)
            return fn

        sides = {impl: stock_fn(impl) for impl in impls}
        sides["moetrim"] = lambda: call(mine, regime, x, routings, weights)
        for fn in sides.values():  # warm-up
            fn()
        samples = {k: [] for k in sides}
        order = list(sides)
        # decode samples are short and noisier; one prefill or training call is a single sample of seconds that
        # machine noise moves by several percent, so those get more samples too
        repeats = args.repeats * 2 if regime.startswith("decode") else args.repeats + 4
        for r in range(repeats):
            if regime.startswith("decode"):
                for k, seconds in interleaved(stock, mine, impls, x, routings, weights, shift=r).items():
                    samples[k].append(seconds)
                continue
            for k in order if r % 2 == 0 else order[::-1]:
                samples[k].append(sides[k]())
        best = {k: min(v) for k, v in samples.items()}
        fastest_stock = min(impls, key=lambda i: best[i])
        pairs = [round(a / b, 4) for a, b in zip(samples[fastest_stock], samples["moetrim"])]
        median = statistics.median(pairs)  # both samples of a round ran in the same round
        fastest = best[fastest_stock] / best["moetrim"]
        row = {
            "model": name, "regime": regime, "tokens": TOKENS[regime], "calls": ROUTINGS[regime],
            "seconds": {k: round(v, 6) for k, v in best.items()},
            "fastest_stock": fastest_stock,
            "estimator": ESTIMATOR[regime],
            "ratio": fastest if ESTIMATOR[regime] == "fastest" else median,
            "ratio_median": median,
            "ratio_fastest": fastest,
            "ratio_pairs": pairs,
            "samples": {k: [round(t, 6) for t in v] for k, v in samples.items()},
        }
        rows.append(row)
        log(f"  {regime:9s} " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items())
            + f"  -> {fastest_stock} / moetrim = {row['ratio']:.3f}")
    del stock, mine
    gc.collect()
    return rows


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats; training against grouped_mm only")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--regimes", default=",".join(TOKENS), help="comma-separated subset of: " + ", ".join(TOKENS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",")]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"error: unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    args.regimes = [g.strip() for g in args.regimes.split(",")]
    bad = [g for g in args.regimes if g not in TOKENS]
    if bad:
        print(f"error: unknown regime {bad[0]!r}; choose from {', '.join(TOKENS)}", file=sys.stderr)
        return 2
    args.dtype = getattr(torch, args.dtype)
    args.repeats = args.repeats or (4 if args.quick else 8)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    rows = [r for n in names for r in run_model(n, args)]
    meta = {"device": "cpu", "dtype": str(args.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "quick": args.quick, "repeats": args.repeats, "seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__, "shared_weights": True,
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    out = args.out or HERE / "results" / "experts_module.json"
    write_json(out, {"meta": meta, "rows": rows}, experts_implementation={f"{r['model']} {r['regime']}": r["fastest_stock"] for r in rows})
    table = (f"### experts module at 0% ({meta['device']}, {meta['dtype']}, {'quick' if args.quick else 'full'})\n\n"
             "Fastest stock implementation's time / `VariableWidthExperts`' time on the same uncompressed layer "
             "(>= 1: ours at least as fast; target >= 0.97): median over rounds for decode and prefill, each side's "
             "fastest sample for train (see the script's docstring).\n\n| model | " + " | ".join(TOKENS) + " |\n|---|"
             + "---|" * len(TOKENS) + "\n")
    for name in names:
        by = {r["regime"]: r for r in rows if r["model"] == name}
        table += f"| {name} | " + " | ".join(f"{by[g]['ratio']:.2f} ({by[g]['fastest_stock']})" if g in by else "-" for g in TOKENS) + " |\n"
    table += (f"\n`python benchmarks/experts_module.py{' --quick' if args.quick else ''}`; {meta['threads']} threads; "
              "in brackets the fastest stock implementation. Decode: 16 calls with different routings; prefill 512 "
              "tokens; train: forward and backward on 256 tokens" + (" (against grouped_mm only in quick mode)" if args.quick else "") + "; "
              f"THP_MEM_ALLOC_ENABLE={meta['thp_mem_alloc']} (large buffers from 2 MiB pages, both sides); both sides read the same weight tensors.\n")
    print(table)
    if args.out is None:
        update_section("experts-module", table)
    log(f"wrote {out} in {meta['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
