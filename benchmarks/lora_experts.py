"""LoRA on fused experts: peft's `target_parameters` against moetrim's experts module, at real layer shapes.

peft wraps each fused [E, out, in] tensor and builds the full E×out×in delta (and W + ΔW) on every
forward; moetrim (`--lora-experts moetrim`) computes B(Ax) only for the tokens routed to each expert.
This times one training step (forward + backward, no optimizer) of a one-layer model with a
family's real expert shapes, both ways at the same rank.

    python benchmarks/lora_experts.py --quick     # OLMoE-1B-7B and Qwen1.5-MoE-A2.7B shapes, 256 tokens
    python benchmarks/lora_experts.py             # the same with 1024 tokens
    python benchmarks/lora_experts.py --memory    # peak memory of training steps, OLMoE and Qwen3-30B-A3B shapes

Writes benchmarks/results/lora_experts.json and a table in benchmarks/README.md; `--memory` writes
lora_experts_memory.json and .png (`lora_memory.py` measures, each run in a process of its own).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lora_memory import memory_main  # noqa: E402
from report import update_section, write_json  # noqa: E402

from moetrim.model.view import find_moe_layers  # noqa: E402

SHAPES = {  # family, hidden, expert width, experts, top-k
    "OLMoE-1B-7B": ("olmoe", 2048, 1024, 64, 8),
    "Qwen1.5-MoE-A2.7B": ("qwen2_moe", 2048, 1408, 60, 4),
}
DEFAULT_OUT = HERE / "results" / "lora_experts.json"


def one_layer(family: str, hidden: int, width: int, experts: int, top_k: int):
    from moetrim.assets.tiny import tiny_model

    kw = dict(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=16, vocab_size=256,
              num_experts_per_tok=top_k)
    if family == "olmoe":
        kw.update(intermediate_size=width, num_experts=experts)
    elif family == "qwen3_moe":
        kw.update(moe_intermediate_size=width, num_experts=experts, decoder_sparse_step=1, mlp_only_layers=[], head_dim=hidden // 16)
    else:
        kw.update(moe_intermediate_size=width, num_experts=experts, shared_expert_intermediate_size=width * 4,
                  decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=width * 4)
    return tiny_model(family, **kw)


def step_seconds(model, ids, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return times[1:]  # the first is a warm-up


def measure(name: str, spec, tokens: int, rank: int, repeats: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from moetrim.train.expert_lora import ExpertLoRA

    family, hidden, width, experts, top_k = spec
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    row = {"shape": name, "hidden": hidden, "width": width, "experts": experts, "top_k": top_k, "tokens": tokens, "rank": rank}
    for impl in ("peft", "moetrim"):
        model = one_layer(*spec)
        for p in model.parameters():
            p.requires_grad_(False)
        if impl == "peft":
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[],
                                                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        else:
            lora = ExpertLoRA(find_moe_layers(model), rank)
            for p in lora.parameters():
                p.requires_grad_(True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        gc.collect()
        times = step_seconds(model, ids, repeats)
        row[impl] = {"seconds": statistics.median(times), "trainable": trainable}
        row["stock_experts_implementation"] = getattr(model.config, "_experts_implementation", None)
        print(f"{name} {impl:8s}: {row[impl]['seconds']:.3f} s/step, {trainable:,} trainable", file=sys.stderr, flush=True)
        del model
        gc.collect()
    row["speedup_moetrim_over_peft"] = row["peft"]["seconds"] / row["moetrim"]["seconds"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--memory", action="store_true", help="measure peak memory of training steps instead of time")
    ap.add_argument("--memory-child", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per step in --memory")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights' dtype in --memory (bfloat16 on CPU adds oneDNN's kernel caches to the resident set)")
    args = ap.parse_args(argv)
    if args.memory or args.memory_child:
        return memory_main(args, one_layer)
    torch.set_num_threads(args.threads)
    tokens = 256 if args.quick else 1024
    t0 = time.perf_counter()
    rows = [measure(name, spec, tokens, args.rank, args.repeats) for name, spec in SHAPES.items()]
    result = {"meta": {"quick": args.quick, "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
                       "device": "cpu", "dtype": "float32"}, "rows": rows}
    write_json(args.out, result, experts_implementation=rows[0].get("stock_experts_implementation"))
    lines = [f"### LoRA on fused experts: peft vs moetrim's experts module (cpu float32, {tokens} tokens, rank {args.rank})", "",
             f"`python benchmarks/lora_experts.py{' --quick' if args.quick else ''}` ({result['meta']['seconds']:.0f} s); one layer at "
             "the family's expert shapes, forward + backward of one step (median of "
             f"{args.repeats}), only the LoRA factors trainable. peft: `target_parameters` on gate_up_proj and down_proj "
             "(rank r per expert on the fused gate_up, r(2H+3I) per expert); moetrim: rank r on gate, up and down separately "
             "(3r(H+I) per expert), computed for routed tokens only.", "",
             "| shape | experts × width | peft s/step | moetrim s/step | moetrim speed-up | trainable peft / moetrim |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['experts']} × {r['width']} (top-{r['top_k']}) | {r['peft']['seconds']:.3f} | "
                     f"{r['moetrim']['seconds']:.3f} | {r['speedup_moetrim_over_peft']:.2f}x | "
                     f"{r['peft']['trainable']:,} / {r['moetrim']['trainable']:,} |")
    lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.out.resolve() == DEFAULT_OUT.resolve():
        update_section("lora-experts", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
