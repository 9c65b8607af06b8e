"""Real checkpoint sizes: wall time and peak memory of every stage against depth, at real layer shapes.

Random-weight bf16 checkpoints with the layer shapes of OLMoE-1B-7B, Qwen3-30B-A3B, Mixtral-8x7B and
a DeepSeek-V3 MoE layer are built on disk shard by shard (never whole in memory), at growing depth.
Each stage then runs as a user runs it, one `moetrim` command in its own process, and its peak
resident memory is that process's own (wait4's ru_maxrss):

  calibrate --sequential        forward statistics, one decoder layer in memory at a time
  calibrate --no-fisher         forward statistics, whole model in memory
  calibrate                     Fisher, whole model in memory (where it fits)
  plan                          from the profile, shapes and routers only
  apply --streaming             one decoder layer in memory at a time
  apply                         whole model in memory, then saved

Last, one full-depth OLMoE-1B-7B (16 layers, 13 GiB of bf16) is compressed end to end with the
modes made for models larger than memory (`compress --sequential --streaming`), and its peak memory
is reported.

    python benchmarks/scale.py            # the grid + the full OLMoE (about an hour on 2 cores)
    python benchmarks/scale.py --quick    # OLMoE shapes at depth 1 and 2 only (a smoke run)

Writes benchmarks/results/scale.json, scale.png and the `scale` section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save_figure, update_section, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Real layer shapes (from the models' published configs); depth is the swept variable.
SHAPES = {
    "olmoe-1b-7b": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                                  num_attention_heads=16, num_key_value_heads=16, vocab_size=50304, norm_topk_prob=False), 16),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                                        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                        vocab_size=151936, norm_topk_prob=True), 48),
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000), 32),
    # DeepSeek-V3's MoE layer at its real hidden size and expert width, with 32 of its 256 routed experts:
    # one full layer (11.3B expert parameters, 22 GB of bf16) does not fit this 24 GB machine.
    "deepseek-v3-layer/32e": ("deepseek_v3", dict(hidden_size=7168, moe_intermediate_size=2048, intermediate_size=18432,
                                                  n_routed_experts=32, num_experts_per_tok=8, n_shared_experts=1, n_group=8,
                                                  topk_group=4, first_k_dense_replace=0, num_attention_heads=16,
                                                  num_key_value_heads=16, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                                                  qk_nope_head_dim=128, v_head_dim=128, vocab_size=32000,
                                                  routed_scaling_factor=2.5), 61),
}


def build_checkpoint(family: str, shape: dict, depth: int, out: Path, seed: int = 0) -> float:
    """A random-weight bf16 checkpoint written one decoder layer at a time; returns GiB on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from moetrim.assets.tiny import tiny_tokenizer
    from moetrim.checkpoint.formats import ShardWriter
    from moetrim.checkpoint.shards import named_decoder_layers, outside_layers

    cfg = AutoConfig.for_model(family, **shape, num_hidden_layers=depth, max_position_embeddings=4096, tie_word_embeddings=False,
                               bos_token_id=0, eos_token_id=127, pad_token_id=127)
    cfg.dtype = "bfloat16"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    out.mkdir(parents=True)
    writer = ShardWriter(out, 2 * 1024**3, {"format": "pt"})
    gen = torch.Generator().manual_seed(seed)
    name, layers = named_decoder_layers(model)
    pieces = outside_layers(model, name) + [f"{name}.{i}" for i in range(depth)]
    for piece in pieces:
        module = model.get_submodule(piece)
        module.to_empty(device="cpu")
        with torch.no_grad():
            for pname, p in module.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.02, generator=gen)
                elif "norm" in pname or "layernorm" in pname:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
            for bname, b in module.named_buffers():
                if b.is_floating_point() and "correction_bias" in bname:
                    b.zero_()
        state = {f"{piece}.{k}": v for k, v in module.state_dict().items()}
        if state:
            writer.add(revert_weight_conversion(model, state))
        module.to("meta")
    writer.finish()
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(out)
    tiny_tokenizer(128).save_pretrained(out)
    return sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30


# A process's peak RSS (ru_maxrss) carries over from the process it was forked from, across exec: a
# stage forked straight from this script would report this script's own peak. A small launcher
# process forks the stage instead and reports the stage's own figure.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "moetrim", *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_stage(args: list[str], log: Path) -> dict:
    """One `moetrim` command in its own process: wall seconds and that process's peak RSS (GiB)."""
    rss = log.with_suffix(".rss")
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call([sys.executable, "-c", _LAUNCHER, str(rss), *args], stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
    peak_kib = int(rss.read_text()) if rss.exists() else 0
    return {"wall_s": round(wall, 2), "peak_gib": round(peak_kib / 2**20, 3), "rc": rc, "last_line": tail[0][:200] if tail else ""}


def _avail_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def grid_point(label: str, depth: int, work: Path, data: Path, tokens: int, fisher_up_to_gib: float, only: set[str] | None = None) -> dict:
    family, shape, _ = SHAPES[label]
    ck = work / "ckpt"
    shutil.rmtree(ck, ignore_errors=True)
    t0 = time.perf_counter()
    size = build_checkpoint(family, shape, depth, ck)
    row = {"shape": label, "depth": depth, "gib": round(size, 3), "build_s": round(time.perf_counter() - t0, 1), "stages": {}}
    common = ["--data", str(data), "--max-tokens", str(tokens), "--seq-len", "256", "--batch-size", "2"]
    stages = row["stages"]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    def stage(name, args):
        needed = set(only or ())
        if needed & {"apply_streaming", "apply_whole"}:
            needed |= {"plan"}  # what the asked stages read
        if "plan" in needed:
            needed |= {"calibrate_sequential"}
        if only is not None and name not in needed:
            return
        stages[name] = run_stage(args, logs / f"{label.replace('/', '_')}-{depth}-{name}.log")
        print(f"  {label} depth {depth} {name}: {stages[name]['wall_s']:.1f} s, {stages[name]['peak_gib']:.2f} GiB"
              f"{'' if stages[name]['rc'] == 0 else ' FAILED: ' + stages[name]['last_line']}", flush=True)

    prof = work / "p.safetensors"
    stage("calibrate_sequential", ["calibrate", str(ck), *common, "--sequential", "--no-fisher", "--out", str(prof), "--overwrite"])
    whole_fits = size * 1.4 < _avail_gib() - 4
    if whole_fits:
        stage("calibrate_whole", ["calibrate", str(ck), *common, "--no-fisher", "--out", str(work / "pw.safetensors"), "--overwrite"])
    if size <= fisher_up_to_gib:
        stage("calibrate_fisher", ["calibrate", str(ck), *common, "--out", str(work / "pf.safetensors"), "--overwrite"])
    plan = work / "plan.json"
    stage("plan", ["plan", str(ck), "--profile", str(prof), "--criterion", "activation", "--ratio", "0.5", "--out", str(plan),
                   "--overwrite"])
    stage("apply_streaming", ["apply", str(ck), "--plan", str(plan), "--out", str(work / "out_s"), "--streaming", "--overwrite"])
    if whole_fits and size * 2.2 < _avail_gib() - 2:
        stage("apply_whole", ["apply", str(ck), "--plan", str(plan), "--out", str(work / "out_m"), "--overwrite"])
        if depth == 1 and "apply_whole" in stages:  # same tensors from both paths (the test suite checks this on tiny models; here at real shapes)
            row["streaming_equals_whole"] = _same_tensors(work / "out_s", work / "out_m")
    for d in ("out_s", "out_m"):
        shutil.rmtree(work / d, ignore_errors=True)
    shutil.rmtree(ck, ignore_errors=True)
    return row


def _same_tensors(a: Path, b: Path) -> bool:
    from moetrim.checkpoint.shards import WeightFiles

    fa, fb = WeightFiles(a), WeightFiles(b)
    if sorted(fa.keys()) != sorted(fb.keys()):
        return False
    return all(torch.equal(fa.read([k])[k], fb.read([k])[k]) for k in fa.keys())


def full_olmoe(work: Path, data: Path, tokens: int) -> dict:
    family, shape, depth = SHAPES["olmoe-1b-7b"]
    ck = work / "olmoe-full"
    shutil.rmtree(ck, ignore_errors=True)
    t0 = time.perf_counter()
    size = build_checkpoint(family, shape, depth, ck)
    row = {"shape": "olmoe-1b-7b", "depth": depth, "gib": round(size, 3), "build_s": round(time.perf_counter() - t0, 1)}
    out = work / "olmoe-full-out"
    row["compress"] = run_stage(["compress", str(ck), "--data", str(data), "--max-tokens", str(tokens), "--seq-len", "256",
                                 "--batch-size", "2", "--sequential", "--streaming", "--criterion", "activation", "--ratio", "0.5",
                                 "--out", str(out), "--overwrite"], work / "olmoe-full.log")
    row["out_gib"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30, 3) if out.exists() else None
    if row["compress"]["rc"] == 0:
        row["inspect"] = run_stage(["inspect", str(out)], work / "olmoe-full-inspect.log")
    print(f"  full OLMoE ({size:.1f} GiB): compress {row['compress']['wall_s']:.0f} s, peak {row['compress']['peak_gib']:.2f} GiB "
          f"-> {row['out_gib']} GiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(ck, ignore_errors=True)
    return row


def table(rows: list[dict], full: dict | None, machine: str) -> str:
    names = ["calibrate_sequential", "calibrate_whole", "calibrate_fisher", "plan", "apply_streaming", "apply_whole"]
    lines = [f"Random-weight bf16 checkpoints at real layer shapes, {machine}. Each cell: wall seconds / peak RSS GiB "
             "of that `moetrim` process (`-`: not run, the whole model would not fit). Calibration on "
             f"{rows[0]['tokens'] if rows else '?'} tokens.", "",
             "| shape | depth | GiB | " + " | ".join(n.replace("_", " ") for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            s = r["stages"].get(n)
            cells.append("-" if s is None else (f"{s['wall_s']:.0f} s / {s['peak_gib']:.2f}" if s["rc"] == 0 else "failed"))
        lines.append(f"| {r['shape']} | {r['depth']} | {r['gib']:.2f} | " + " | ".join(cells) + " |")
    if full:
        c = full["compress"]
        lines += ["", f"Full-depth OLMoE-1B-7B ({full['depth']} layers, {full['gib']:.1f} GiB bf16 on disk), "
                  f"`moetrim compress --sequential --streaming --criterion activation --ratio 0.5`: "
                  f"{c['wall_s']:.0f} s, peak RSS **{c['peak_gib']:.2f} GiB** "
                  f"({c['peak_gib'] / full['gib']:.2f} of the model), output {full['out_gib']} GiB."
                  if c["rc"] == 0 else f"Full-depth OLMoE-1B-7B: compress failed: {c['last_line']}"]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, full: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6))
    styles = {"calibrate_sequential": ("C0", "-"), "calibrate_whole": ("C0", ":"), "apply_streaming": ("C1", "-"),
              "apply_whole": ("C1", ":")}
    markers = dict(zip(SHAPES, "osD^"))
    for label in SHAPES:
        pts = sorted((r for r in rows if r["shape"] == label), key=lambda r: r["depth"])
        if len(pts) < 2:
            continue
        for stage, (color, ls) in styles.items():
            xs = [r["depth"] for r in pts if stage in r["stages"] and r["stages"][stage]["rc"] == 0]
            if len(xs) < 2:
                continue
            ys_t = [r["stages"][stage]["wall_s"] for r in pts if stage in r["stages"] and r["stages"][stage]["rc"] == 0]
            ys_m = [r["stages"][stage]["peak_gib"] for r in pts if stage in r["stages"] and r["stages"][stage]["rc"] == 0]
            kw = dict(color=color, ls=ls, marker=markers[label], label=f"{label}: {stage.replace('_', ' ')}")
            axes[0].plot(xs, ys_t, **kw)
            axes[1].plot(xs, ys_m, **kw)
    if full and full["compress"]["rc"] == 0:
        kw = dict(color="C2", marker="*", markersize=14, ls="none", label="olmoe-1b-7b full depth: compress --sequential --streaming")
        axes[0].plot([full["depth"]], [full["compress"]["wall_s"]], **kw)
        axes[1].plot([full["depth"]], [full["compress"]["peak_gib"]], **kw)
    axes[0].set(xlabel="decoder layers", ylabel="wall seconds", title="time against depth")
    axes[1].set(xlabel="decoder layers", ylabel="peak RSS (GiB)", title="peak memory against depth (solid: one layer at a time)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="OLMoE shapes at depth 1 and 2, no full model")
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens per run")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (needs about 30 GB free)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-depth OLMoE")
    ap.add_argument("--shapes", default=None, help="comma-separated shapes of the grid to run (default: all)")
    ap.add_argument("--stages", default=None, help="comma-separated stages to run; with --update, only these are replaced")
    ap.add_argument("--update", action="store_true", help="replace the stages run in the existing results/scale.json and redraw")
    ap.add_argument("--report-only", action="store_true", help="redraw the table and plot from results/scale.json")
    args = ap.parse_args()
    if args.report_only:
        old = json.loads((RESULTS / "scale.json").read_text())
        plot(old["grid"], RESULTS / "scale.png", old.get("full_olmoe"))
        text = table(old["grid"], old.get("full_olmoe"), old["machine"])
        print(text)
        update_section("scale", "## Real checkpoint sizes (`benchmarks/scale.py`)\n\n" + text + "\n\n![scale](results/scale.png)")
        return
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work or tempfile.mkdtemp(prefix="moetrim-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "calib.txt"
    subprocess.run([sys.executable, "-m", "moetrim", "tasks", "math", "--split", "calib", "--n", "400", "--out", str(data),
                    "--overwrite"], check=True, capture_output=True)
    if args.quick:
        grid = {"olmoe-1b-7b": [1, 2]}
    else:
        grid = {"olmoe-1b-7b": [1, 2, 4, 8], "qwen3-30b-a3b": [1, 2, 4], "mixtral-8x7b": [1, 2], "deepseek-v3-layer/32e": [1, 2]}
    if args.shapes:
        grid = {k: v for k, v in grid.items() if k in args.shapes.split(",")}
    only = set(args.stages.split(",")) if args.stages else None
    rows = []
    for label, depths in grid.items():
        for depth in depths:
            row = grid_point(label, depth, work, data, args.tokens, fisher_up_to_gib=3.5, only=only)
            row["tokens"] = args.tokens
            rows.append(row)
    full = None if args.quick or args.no_full else full_olmoe(work, data, args.tokens)
    if args.update:  # fold this run's stages into the previous full run
        old = json.loads((RESULTS / "scale.json").read_text())
        for row in rows:
            for prev in old["grid"]:
                if (prev["shape"], prev["depth"]) == (row["shape"], row["depth"]):
                    prev["stages"].update(row["stages"])
                    prev.setdefault("rerun", []).extend(sorted(row["stages"]))
        rows, full = old["grid"], full or old.get("full_olmoe")
    machine = f"{os.cpu_count()} CPU cores, {_avail_gib():.0f} GiB RAM, CPU only"
    result = {"machine": machine, "tokens": args.tokens, "grid": rows, "full_olmoe": full, "quick": args.quick}
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    write_json(RESULTS / f"scale{suffix}.json", result)
    plot(rows, RESULTS / f"scale{suffix}.png", full)
    text = table(rows, full, machine)
    print(text)
    if not args.quick:
        update_section("scale", "## Real checkpoint sizes (`benchmarks/scale.py`)\n\n" + text + "\n\n![scale](results/scale.png)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
