"""Serve moetrim's formats in vLLM at a real MoE layer shape: greedy equality, memory held, decode speed.

On the bundled reference model (hidden 128) vLLM's per-step overhead decides decode throughput, so
`serve.py`'s speed column says little. Here every MoE layer has OLMoE-1B-7B's shape (hidden 2048, 64
experts of width 1024, top-8), with 2 decoder layers and random weights, so the expert kernels decide.
Checkpoints, each made with moetrim's own modules and saved with `moetrim.save`:

  * dense (the random model, standard format), and the same checkpoint once more in a second engine: the
    harness's own bias (every other row is a second engine measured against the first);
  * replace at 50% of routed weights: 16 experts kept, 12 groups of 4 on a shared base with rank-64
    corrections, served natively and, labelled, reconstructed (MOETRIM_VLLM_REPLACED=reconstructed);
  * rerouted: a routing bias and r = 2 condensers (budget additive: 10 experts per token where dense runs 8);
  * Fisher-free global widths at 50% (random criterion, widths in multiples of 128), served grouped.

For each: vLLM's greedy tokens against transformers' (fp32), the routed-expert parameters vLLM holds
(read from the built model), and decode tokens/s with all prompts in one batch, in rounds alternating with
dense (median of per-round ratios). Run with a vLLM environment's python (see serve.py):

    /path/to/vllm-venv/bin/python benchmarks/serve_shapes.py [--prompts 16] [--rounds 3]

Writes benchmarks/results/serve_shapes.json and the `serve_shapes` section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHAPE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, head_dim=128, intermediate_size=1024,
             num_experts=64, num_experts_per_tok=8, num_hidden_layers=2, vocab_size=1024, norm_topk_prob=False,
             max_position_embeddings=256, bos_token_id=1023, eos_token_id=1023, pad_token_id=1023)
# The same dense checkpoint in a second engine: what the harness itself gives a model equal to dense (the
# engine made second has measured faster than the first here, 1.05-1.18x per round).
CONTROL = "dense, second engine (harness control)"


def build(work: Path) -> dict[str, Path]:
    """The random OLMoE-shaped model and its moetrim checkpoints (see the module docstring)."""
    import torch

    import moetrim
    from moetrim.apply.replace import build_replaced
    from moetrim.assets.tiny import tiny_model, tiny_tokenizer
    from moetrim.model.replaced import install_layer
    from moetrim.model.routing import RoutingSpec, choose_condensers, install_routing
    from moetrim.model.view import find_moe_layers
    from moetrim.plan import make_plan

    tok = tiny_tokenizer(SHAPE["vocab_size"])

    def fresh():
        return tiny_model("olmoe", seed=0, **SHAPE)

    out = {"dense": moetrim.save(fresh(), work / "dense", tokenizer=tok)}
    out[CONTROL] = out["dense"]
    m = fresh()
    for layer in find_moe_layers(m):
        groups = [list(range(16 + 4 * g, 20 + 4 * g)) for g in range(12)]
        install_layer(m, layer, build_replaced(layer, list(range(16)), groups, 64, seed=0))
    out["replace 50% (native)"] = out["replace 50% (reconstructed)"] = moetrim.save(m, work / "replace", tokenizer=tok)
    m = fresh()
    install_routing(m, RoutingSpec(bias=True, condensers=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("moetrim_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    choose_condensers(m)
    out["rerouted r=2 (condensers + bias)"] = moetrim.save(m, work / "rerouted", tokenizer=tok)
    m = fresh()
    plan = make_plan(m, None, criterion="random", ratio=0.5, allocation="global", round_to=128, seed=1)
    moetrim.apply_plan(m, plan, force_varwidth=True)
    out["dims 50% global round-to 128 (grouped)"] = moetrim.save(m, work / "global", tokenizer=tok, plan=plan)
    return out


def prompts(n: int) -> list[str]:
    words = ["the", "model", "routes", "tokens", "to", "experts", "and", "keeps", "what", "they", "know"]
    return [" ".join(words[(i + j) % len(words)] for j in range(6 + i % 5)) for i in range(n)]


def main() -> None:
    import serve

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    serve.common_arguments(ap, 16, 16, 32)
    ap.add_argument("--only", default=None, help="serve only these rows (comma-separated names; dense always runs); "
                    "the README is left alone")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve_shapes.json")
    args = ap.parse_args()
    try:
        import vllm
    except ImportError:
        sys.exit("benchmarks/serve_shapes.py needs vLLM: run it with a vLLM environment's python (serve.py --make-venv PATH)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    ps = prompts(args.prompts)
    results: dict = {"shape": SHAPE, "prompts": len(ps), "new_tokens": args.new_tokens, "bench_tokens": args.bench_tokens,
                     "rounds": args.rounds, "vllm": vllm.__version__, "models": {}}
    with tempfile.TemporaryDirectory(prefix="moetrim-serve-shapes-") as tmp:
        paths = build(Path(tmp))
        if args.only:
            keep = {n.strip() for n in args.only.split(",") if n.strip()}
            unknown = sorted(keep - set(paths))
            if unknown:
                sys.exit(f"--only: no row named {', '.join(unknown)}; rows: {', '.join(paths)}")
            paths = {n: p for n, p in paths.items() if n == "dense" or n in keep}
        dense = serve.vllm_engine(paths["dense"], "dense")
        speeds = {n: [] for n in paths}
        ratios = {n: [] for n in paths if n != "dense"}
        for name, path in paths.items():
            llm = dense if name == "dense" else serve.vllm_engine(path, name)
            row = serve.equality(path, llm, ps, args.new_tokens)
            row["routed_params"] = serve.routed_params(path)
            held = serve.held_params(llm)
            row["served_routed_params"] = held["held_routed_params"] if held else None
            results["models"][name] = row
            print(f"{name}: vLLM = transformers on {row['equal']}/{row['n']} prompts", flush=True)
            if name != "dense":
                serve.alternate(name, llm, dense, ps, args.bench_tokens, args.rounds, speeds, ratios)
                del llm
                gc.collect()
        base = results["models"]["dense"]
        for name, row in results["models"].items():
            row["tokens_per_s"] = statistics.median(speeds[name])
            row["routed_params_vs_dense"] = row["routed_params"] / base["routed_params"]
            if row["served_routed_params"] and base["served_routed_params"]:
                row["served_params_vs_dense"] = row["served_routed_params"] / base["served_routed_params"]
            if name != "dense":
                row["speedup_vs_dense"] = statistics.median(ratios[name])
                row["speedup_rounds"] = ratios[name]
        del dense
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["only"] = args.only
    report(results, args.out)


def report(results: dict, out: Path) -> None:
    from report import update_section, write_json

    write_json(out, results)
    s = results["shape"]
    lines = [f"vLLM {results['vllm']} on CPU (fp32, enforce_eager), random weights at OLMoE-1B-7B's MoE layer shape "
             f"(hidden {s['hidden_size']}, {s['num_experts']} experts of width {s['intermediate_size']}, top-"
             f"{s['num_experts_per_tok']}), {s['num_hidden_layers']} layers; {results['prompts']} prompts in one batch, "
             f"{results['bench_tokens']} new tokens each, {results['rounds']} rounds alternating with dense, median of "
             "per-round ratios.", "",
             "| checkpoint | greedy = transformers | routed params stored / held by vLLM vs dense | decode tokens/s | vs dense |",
             "|---|---|---|---|---|"]
    for name, row in results["models"].items():
        control = f" ({row['equal_if_routing_ignored']}/{row['n']} if routed stock)" if "equal_if_routing_ignored" in row else ""
        held = f"{row['served_params_vs_dense']:.2f}" if "served_params_vs_dense" in row else "?"
        lines.append(f"| {name} | {row['equal']}/{row['n']}{control} | {row['routed_params_vs_dense']:.2f} / {held} | "
                     f"{row['tokens_per_s']:.1f} | {row.get('speedup_vs_dense', 1.0):.2f} |")
    spread = [r for row in results["models"].values() for r in row.get("speedup_rounds", [])]
    lines += ["", f"Per-round ratios ranged {min(spread):.2f}-{max(spread):.2f}. The control row is dense itself in a "
              "second engine: every other row is also a second engine measured against the first, so read their "
              "ratios against the control's, not against 1. Random weights route differently once a layer's experts "
              "change, and decode here reads the experts its tokens route to, so a row's speed against dense mixes "
              "its kernels with its routing; replace native against replace reconstructed (the same function, so the "
              "same routing, on the stock kernel) isolates the kernel."]
    native, rebuilt = results["models"].get("replace 50% (native)"), results["models"].get("replace 50% (reconstructed)")
    if native and rebuilt:
        lines[-1] += (f" Here that is {native['speedup_vs_dense'] / rebuilt['speedup_vs_dense']:.2f} (their ratios to dense, "
                      "each taken against dense in the same rounds), holding "
                      f"{native['served_routed_params'] / rebuilt['served_routed_params']:.2f} of the weights.")
    lines += ["", f"`/path/to/vllm-venv/bin/python benchmarks/serve_shapes.py` ({results.get('wall_s', 0) / 60:.0f} minutes "
              "on this 2-core machine)."]
    table = "\n".join(lines)
    if out.resolve() == (HERE / "results" / "serve_shapes.json").resolve() and not results.get("only"):
        update_section("serve_shapes", "## Serving in vLLM at a real layer shape (`benchmarks/serve_shapes.py`)\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
