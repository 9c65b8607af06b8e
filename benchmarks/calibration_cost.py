"""What calibration costs over a plain pass of the same model and batch, in time and peak memory.

    plain forward            stock model, no_grad, fastest stock experts implementation
    plain body forward       the same without the LM head (forward-only calibration has no use for
                             logits, so this isolates what the instrumentation itself costs)
    plain forward+backward   stock model, loss.backward() with every weight trainable
    calibrate --no-fisher    moetrim's instrumented forward (statistics only)
    calibrate (Fisher)       instrumented forward + backward (only the masks get gradients)

Time: each mode runs `--batches` batches, alternating between modes, median of `--repeats`.
Peak memory: each mode in its own process (peak RSS above the loaded model on CPU; CUDA peak
allocated on GPU). Targets: Fisher <= 1.3x forward+backward, forward-only <= 1.15x forward.

    python benchmarks/calibration_cost.py [--quick] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import update_section, write_json  # noqa: E402
from speed import MODELS, build  # noqa: E402  (same real shapes as the speed benchmark)

MODES = ("forward", "body_forward", "calibrate_forward", "forward_backward", "calibrate_fisher")


def step_fn(mode: str, model, ids):
    from moetrim.calibrate import calibrate

    if mode == "forward":
        def run():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
    elif mode == "body_forward":
        body = getattr(model, model.base_model_prefix)

        def run():
            with torch.no_grad():
                body(input_ids=ids, use_cache=False)
    elif mode == "forward_backward":
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    elif mode == "calibrate_forward":
        def run():
            calibrate(model, [ids], seq_len=ids.shape[1], batch_size=ids.shape[0], fisher=False)
    else:
        def run():
            calibrate(model, [ids], seq_len=ids.shape[1], batch_size=ids.shape[0], fisher=True, grad_magnitude=GRAD_MAGNITUDE)
    return run


GRAD_MAGNITUDE = False


def timed(run, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def setup(args):
    model = build(MODELS[args.model], args.layers, getattr(torch, args.dtype), args.device)
    model.set_experts_implementation(args.impl)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(args.device)
    return model, ids


class RssPeak:
    """Peak resident memory of this process while the block runs (sampled every millisecond)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.now()
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.now())


def memory_child(args) -> None:
    """Run one mode in a fresh process and print its peak memory above the loaded model
    (a plain forward+backward counts its weight gradients, as training does)."""
    model, ids = setup(args)
    run = step_fn(args.child, model, ids)
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with RssPeak() as rss:
            run()
        peak = rss.peak - rss.base
    print(json.dumps({"mode": args.child, "peak_bytes": int(peak)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="Qwen1.5-MoE-A2.7B", choices=list(MODELS))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--impl", default="grouped_mm", help="stock experts implementation for the plain passes")
    ap.add_argument("--grad-magnitude", action="store_true", help="Fisher calibration also records grad-magnitude")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global GRAD_MAGNITUDE
    GRAD_MAGNITUDE = args.grad_magnitude
    if args.child:
        memory_child(args)
        return 0
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model, ids = setup(args)
    runs = {m: step_fn(m, model, ids) for m in MODES}
    for m in MODES:  # warm-up
        runs[m]()
    times = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for m in MODES:
            times[m].append(timed(runs[m], args.device))
    med = {m: statistics.median(v) for m, v in times.items()}
    del model
    peaks = {}
    base_cmd = [sys.executable, __file__, "--model", args.model, "--layers", str(args.layers), "--batch", str(args.batch),
                "--seq-len", str(args.seq_len), "--device", args.device, "--dtype", args.dtype, "--impl", args.impl]
    if args.grad_magnitude:
        base_cmd.append("--grad-magnitude")
    for m in MODES:
        proc = subprocess.run(base_cmd + ["--child", m], capture_output=True, text=True, check=True)
        peaks[m] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    result = {
        "model": args.model, "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len,
        "device": args.device, "dtype": args.dtype, "plain_impl": args.impl, "repeats": args.repeats,
        "grad_magnitude": args.grad_magnitude,
        "seconds": med, "peak_bytes": peaks,
        "time_ratio_forward": med["calibrate_forward"] / med["forward"],
        "time_ratio_forward_vs_body": med["calibrate_forward"] / med["body_forward"],
        "memory_ratio_forward_vs_body": peaks["calibrate_forward"] / max(peaks["body_forward"], 1),
        "time_ratio_fisher": med["calibrate_fisher"] / med["forward_backward"],
        "memory_ratio_forward": peaks["calibrate_forward"] / max(peaks["forward"], 1),
        "memory_ratio_fisher": peaks["calibrate_fisher"] / max(peaks["forward_backward"], 1),
    }
    out = args.out or HERE / "results" / ("calibration_cost-gpu.json" if args.device.startswith("cuda") else "calibration_cost.json")
    write_json(out, result, experts_implementation=args.impl)
    lines = [f"### calibration cost ({args.model} shapes, {args.layers} layer(s), batch {args.batch}x{args.seq_len}, {args.device} {args.dtype})", "",
             f"`python benchmarks/calibration_cost.py{' --quick' if args.quick else ''}`; plain passes use the stock `{args.impl}` experts; "
             "a plain forward+backward computes every weight gradient, as training does.", "",
             "| pass | seconds (median) | peak MiB above the loaded model |", "|---|---|---|"]
    for m in MODES:
        lines.append(f"| {m.replace('_', ' ')} | {med[m]:.3f} | {peaks[m] / 2**20:.0f} |")
    lines += ["", f"- time: forward-only calibration / forward = **{result['time_ratio_forward']:.2f}** (target <= 1.15); "
              f"Fisher calibration / forward+backward = **{result['time_ratio_fisher']:.2f}** (target <= 1.3)",
              f"- peak memory: forward-only calibration / forward = **{result['memory_ratio_forward']:.2f}** (target <= 1.15); "
              f"Fisher calibration / forward+backward = **{result['memory_ratio_fisher']:.2f}** (target <= 1.3)",
              f"- instrumentation alone: forward-only calibration / body forward (no LM head) = "
              f"**{result['time_ratio_forward_vs_body']:.2f}** time, **{result['memory_ratio_forward_vs_body']:.2f}** memory", ""]
    table = "\n".join(lines)
    print(table)
    update_section("calibration-cost-gpu" if args.device.startswith("cuda") else "calibration-cost", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
