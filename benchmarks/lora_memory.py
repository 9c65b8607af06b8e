"""Peak memory of expert-LoRA training steps (`python benchmarks/lora_experts.py --memory`).

Each (implementation, shape) runs in a process of its own: a one-layer model at the family's real
expert shapes (random weights), LoRA of rank r on the routed experts, AdamW on the factors, two
training steps of `--tokens` tokens. The peak is the process's resident-set high-water mark during
the steps (reset through /proc/self/clear_refs after the model is built, so building it does not
count) less its resident set before the model existed; it is compared with what training must hold:
the model, the trainable factors, their gradients and the optimizer state (`ratio`; the target for moetrim
is <= 1.05; `ratio_without_gradients` leaves the gradients out of what is held).
The children run with glibc's mmap threshold fixed at 128 KiB (`MALLOC`), so freed blocks leave the
resident set and the peak is what was allocated at once.

- `moetrim`: `ExpertLoRA` as it is now (factors on the stock module, the fused tensors read in place);
- `copy`: the earlier `ExpertLoRA`, rebuilt here for comparison: every expert copied into a
  `ReplacedExperts` group of one, the stock module kept to fold the factors back into;
- `peft`: peft's `target_parameters` on gate_up_proj and down_proj.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHAPES = {  # family, hidden, expert width, experts, top-k
    "OLMoE-1B-7B": ("olmoe", 2048, 1024, 64, 8),
    "Qwen3-30B-A3B": ("qwen3_moe", 2048, 768, 128, 8),
}
IMPLS = ("moetrim", "copy", "peft")
OUT = HERE / "results" / "lora_experts_memory.json"
TARGET = 1.05
# glibc serves blocks above 128 KiB by mmap and returns them on free: the resident set then follows what
# is allocated (as torch.cuda.max_memory_allocated does on a GPU), not what the heap has cached
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _settle() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the resident set is what is held
    except OSError:
        pass


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _copying_lora(model, rank: int) -> list:
    """The earlier expert LoRA: a ReplacedExperts copy of every expert, factors trainable."""
    from moetrim.apply.replace import build_replaced
    from moetrim.model.view import find_moe_layers

    factors, keep = [], []
    for layer in find_moe_layers(model):
        new = build_replaced(layer, [], [[e] for e in range(layer.num_experts)], rank, init="zero", seed=0)
        for name, p in new.named_parameters():
            p.requires_grad_(name.endswith(("_a", "_b")))
            if p.requires_grad:
                factors.append(p)
        name = next(c for c, m in layer.block.named_children() if m is layer.experts)
        keep.append(layer.experts)  # the stock module stays, to fold the factors back into after training
        setattr(layer.block, name, new)
    model._stock_kept = keep
    return factors


def child(impl: str, shape: str, tokens: int, rank: int, dtype: torch.dtype, one_layer) -> dict:
    """One measurement in this process; returns the JSON row."""
    torch.manual_seed(0)
    family, _, _, _, top_k = SHAPES[shape]
    _steps(impl, one_layer(family, 64, 32, 4, min(top_k, 2)).to(dtype), rank, 16)  # warm-up: modules imported, kernels loaded
    _settle()
    before = _rss_kib("VmRSS")
    model = one_layer(*SHAPES[shape]).to(dtype)
    model_bytes = _bytes(list(model.parameters()) + list(model.buffers()))
    _settle()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: building the model does not count
    model, factors, opt = _steps(impl, model, rank, tokens)
    peak = (_rss_kib("VmHWM") - before) * 1024
    state = _bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    held = model_bytes + 2 * _bytes(factors) + state  # the factors and their gradients: any training step holds both
    stock = getattr(getattr(model, "config", None), "_experts_implementation", None)
    return {"impl": impl, "stock_experts_implementation": stock, "shape": shape, "tokens": tokens, "rank": rank, "dtype": str(dtype).replace("torch.", ""),
            "peak_bytes": peak, "model_bytes": model_bytes, "factor_bytes": _bytes(factors), "gradient_bytes": _bytes(factors),
            "optimizer_bytes": state, "ratio": peak / held, "ratio_without_gradients": peak / (held - _bytes(factors))}


def _steps(impl: str, model, rank: int, tokens: int):
    """LoRA of `impl` on the frozen model, AdamW on its factors, two training steps."""
    from moetrim.model.view import find_moe_layers
    from moetrim.train.expert_lora import ExpertLoRA

    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[],
                                                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        factors = [p for p in model.parameters() if p.requires_grad]
    elif impl == "copy":
        factors = _copying_lora(model, rank)
    else:
        factors = ExpertLoRA(find_moe_layers(model), rank).parameters()
        for p in factors:
            p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(factors, lr=1e-4)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, factors, opt


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from report import save_figure

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(IMPLS)
    for i, impl in enumerate(IMPLS):
        vals = [next((r["ratio"] for r in rows if r["shape"] == s and r["impl"] == impl), float("nan")) for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=impl)
    ax.axhline(TARGET, color="k", lw=0.8, ls="--", label=f"target {TARGET}")
    ax.set_xticks([j + width for j in range(len(shapes))], shapes)
    ax.set_ylabel("peak / (model + factors + grads + AdamW state)")
    ax.set_title("Expert LoRA: peak memory of a training step")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def memory_main(args, one_layer) -> int:
    """`--memory`: every (impl, shape) in a child process, then JSON, PNG and the README table."""
    from report import update_section, write_json

    dtype = getattr(torch, args.dtype)
    if args.memory_child:
        impl, shape = args.memory_child
        print(json.dumps(child(impl, shape, args.tokens, args.rank, dtype, one_layer)))
        return 0
    torch.set_num_threads(args.threads)
    rows = []
    for shape in SHAPES:
        for impl in IMPLS:
            cmd = [sys.executable, str(HERE / "lora_experts.py"), "--memory-child", impl, shape, "--tokens", str(args.tokens),
                   "--rank", str(args.rank), "--dtype", args.dtype, "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC, "PYTHONWARNINGS": "ignore"})
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{shape} {impl:8s}: peak {r['peak_bytes'] / 2**30:.2f} GiB, held {(r['peak_bytes'] / r['ratio']) / 2**30:.2f} GiB, "
                  f"ratio {r['ratio']:.3f}", file=sys.stderr, flush=True)
    out = OUT if args.out.name == "lora_experts.json" else args.out
    write_json(out, {"meta": {"tokens": args.tokens, "rank": args.rank, "dtype": args.dtype, "threads": args.threads,
                              "target_ratio": TARGET}, "rows": rows},
               experts_implementation=next((r["stock_experts_implementation"] for r in rows if r["impl"] == "peft"), None))
    plot(rows, out.with_suffix(".png"))
    gib = 2**30
    lines = [f"### LoRA on fused experts: peak memory of a training step ({args.dtype}, {args.tokens} tokens, rank {args.rank})", "",
             f"`python benchmarks/lora_experts.py --memory`; one layer at the family's expert shapes (random weights), AdamW on the "
             "LoRA factors, two steps, each implementation in a process of its own. peak: resident-set high-water mark during the "
             "steps less the resident set before the model existed; held: model + trainable factors + their gradients + AdamW "
             "state; target "
             f"peak/held <= {TARGET} for moetrim. `copy`: the earlier moetrim version (a second copy of every expert); `peft`: "
             "`target_parameters` (builds W + ΔW every forward).", "",
             "| shape | implementation | model GiB | factors + grads + AdamW GiB | peak GiB | peak / held | without grads |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['impl']} | {r['model_bytes'] / gib:.2f} | "
                     f"{(r['factor_bytes'] + r['gradient_bytes'] + r['optimizer_bytes']) / gib:.3f} | "
                     f"{r['peak_bytes'] / gib:.2f} | {r['ratio']:.3f} | {r['ratio_without_gradients']:.3f} |")
    lines += ["", "What a peak holds beyond that is the step's activations (logits over the vocabulary included), which grow "
              "with the tokens; `copy` and `peft` hold a second expert-sized tensor (the copy; W + ΔW).", "",
              f"![expert LoRA peak memory](results/{out.with_suffix('.png').name})", ""]
    table = "\n".join(lines)
    print(table)
    if out.resolve() == OUT.resolve():
        update_section("lora-experts-memory", table)
    return 0
