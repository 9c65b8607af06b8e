"""`moetrim demo`: the whole pipeline on the bundled reference model, dense vs compressed.

Calibrates on a mixture of every task domain, trims routed-expert dimensions by Fisher importance
(global allocation), saves the compressed checkpoint, and measures both models side by side:
per-domain accuracy and perplexity, weight memory, prefill and decode tokens/s.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable

import torch

from moetrim.calibrate import calibrate
from moetrim.checkpoint import load_model, load_tokenizer, make_recipe, save_checkpoint
from moetrim.checkpoint.atomic import atomic_dir
from moetrim.evaluate.summary import weight_bytes
from moetrim.evaluate.throughput import compare_throughput
from moetrim.pipeline.compress import compress


def run_demo(
    out_dir: Path,
    *,
    model: str = "reference",
    ratio: float = 0.5,
    criterion: str = "fisher",
    allocation: str = "global",
    calib_per_domain: int = 64,
    eval_items: int = 200,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Run the demo and write OUT/results.json and OUT/compressed/; returns the results dict."""
    with atomic_dir(out_dir) as work:  # all or nothing: an interrupted demo leaves no folder behind
        return _run(work, out_dir, model, ratio, criterion, allocation, calib_per_domain, eval_items, seed, log)


def _run(work: Path, out_dir: Path, model: str, ratio: float, criterion: str, allocation: str, calib_per_domain: int,
         eval_items: int, seed: int, log: Callable[[str], None]) -> dict:
    from moetrim.assets import resolve_model_path, trained_domains
    from moetrim.data.tasks import DOMAINS, calibration_texts
    from moetrim.evaluate.tasks_eval import evaluate_tasks

    t0 = time.perf_counter()
    model, fallback = _demo_model(model, work, log)
    dense = load_model(model, dtype=torch.float32)
    tok = load_tokenizer(model)
    domains = trained_domains(resolve_model_path(model)) or list(DOMAINS)  # a bundled model's own skills
    log(f"calibrating on {calib_per_domain} items of each domain ({', '.join(domains)})")
    texts = calibration_texts(domains, n_per_domain=calib_per_domain, seed=seed)
    profile = calibrate(dense, texts, tokenizer=tok, seq_len=256, batch_size=8, seed=seed, progress=True)
    compressed = copy.deepcopy(dense)
    done = compress(compressed, texts, "dims", ratio, tok, profile=profile, criterion=criterion, allocation=allocation, seed=seed)
    plan, fmt = done.plan, done.report["format"]
    shown_model = str(out_dir / Path(model).relative_to(work)) if fallback else str(model)
    save_checkpoint(compressed, work / "compressed", tokenizer=tok, plan=plan, profile=profile,
                    recipe=make_recipe(plan, profile, shown_model, fmt))
    models = {"dense": dense, "compressed": compressed}
    results: dict = {}
    for name, m in models.items():
        log(f"evaluating {name} on {eval_items} items per domain")
        ev = evaluate_tasks(m, tok, domains, n=eval_items, batch_size=64)
        results[name] = {
            "accuracy": ev["accuracy"],
            "perplexity": ev["perplexity"],
            "mean_accuracy": sum(ev["accuracy"].values()) / len(ev["accuracy"]),
            "weight_bytes": weight_bytes(m),
        }
    log("measuring throughput (dense and compressed alternating)")
    speed = compare_throughput(models, vocab_size=dense.config.vocab_size, prompt_len=128, decode_steps=32,
                               batch_sizes=(1, 8), repeats=5, seed=seed, threads=1)
    for name in models:
        results[name].update(speed[name])
    d, c = results["dense"], results["compressed"]
    results["method"] = {
        "model": shown_model,
        "granularity": "dims",
        "criterion": criterion,
        "ratio": ratio,
        "allocation": allocation,
        "removed_fraction": round(plan.removed_fraction, 6),
        "checkpoint_format": fmt,
        "calibration_tokens": profile.tokens,
        "eval_items_per_domain": eval_items,
        "throughput_threads": 1,
        "fallback_tiny_random_model": fallback,
    }
    results["ratios"] = {
        "mean_accuracy": c["mean_accuracy"] / d["mean_accuracy"] if d["mean_accuracy"] else None,
        "weight_bytes": c["weight_bytes"] / d["weight_bytes"],
        "prefill_speedup": c["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
        "decode_speedup": c["decode_tokens_per_s"] / d["decode_tokens_per_s"],
        "decode_speedup_b8": c["decode_tokens_per_s_b8"] / d["decode_tokens_per_s_b8"],
    }
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _demo_model(model: str, out_dir: Path, log: Callable[[str], None]) -> tuple[str, bool]:
    """The reference model when its weights are bundled; else a tiny random-weight Qwen2-MoE built
    here (accuracy is then meaningless, but every stage and measurement still runs for real)."""
    if model != "reference":
        return model, False
    from moetrim.assets import REFERENCE_DIR

    if (REFERENCE_DIR / "model.safetensors").is_file():
        return model, False
    from moetrim.assets.tiny import save_tiny

    log("the reference weights are not bundled in this build: running on a tiny random-weight Qwen2-MoE "
        "(task accuracy is meaningless; memory, speed and the pipeline are real)")
    path = out_dir / "tiny-random-model"
    if not (path / "config.json").is_file():
        save_tiny("qwen2_moe", path, num_hidden_layers=4, num_experts=16, moe_intermediate_size=64, mlp_only_layers=[])
    return str(path), True


def fresh_out_dir(base: Path = Path(".")) -> Path:
    """moetrim-demo, moetrim-demo-2, ...: the first that does not exist yet."""
    n = 1
    while True:
        p = base / ("moetrim-demo" if n == 1 else f"moetrim-demo-{n}")
        if not p.exists():
            return p
        n += 1
