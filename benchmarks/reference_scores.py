"""The bundled reference models' own scores: eval-split accuracy on every skill each was trained on, and on its
fine-tuning domain (which it never saw), beside the calib-split scores its training recorded.

    python benchmarks/reference_scores.py                     # every bundled model whose weights are present
    python benchmarks/reference_scores.py --model longtail
    python benchmarks/reference_scores.py --model longtail --weights DIR --out F   # candidate weights (a training run's
                                                                                  # --out), README and default JSON untouched

Writes benchmarks/results/reference_scores.json (one entry per model, others kept) and a table in
benchmarks/README.md. Each entry also breaks the code skill's eval items down by program kind (two
variables with +, - or *, composition, reassignment, the rest), wrong answers per kind: where a model's
code score is lost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import bundled_model, load_model, update_section, write_json  # noqa: E402

from moetrim.assets import BUNDLED, training_record  # noqa: E402
from moetrim.data.tasks import get_items, normalise_program  # noqa: E402
from moetrim.evaluate.tasks_eval import _encode_pairs, evaluate_tasks, greedy_generate  # noqa: E402

OUT = HERE / "results" / "reference_scores.json"
# Program kinds of the code skill (`moetrim.data.tasks._code_item`), read off the program with variables renamed.
CODE_KINDS = (("two variables, -", r"x0=\d+;x1=\d+;print\(x0-x1\)"), ("two variables, *", r"x0=\d+;x1=\d+;print\(x0\*x1\)"),
              ("two variables, +", r"x0=\d+;x1=\d+;print\(x0\+x1\)"), ("composition", r"x0=\d+;x1=x0[-+]\d+;"),
              ("reassignment", r"x0=\d+;x0=x0[-+]\d+;"))


def code_kind(prompt: str) -> str:
    prog = normalise_program(prompt.split("Q: ", 1)[-1].split("\n", 1)[0])
    return next((kind for kind, pattern in CODE_KINDS if re.match(pattern, prog)), "lists, max/min, conditionals")


def code_breakdown(model, tok, n: int | None) -> dict:
    """{kind: {"items", "wrong"}} over the code skill's eval split."""
    items = get_items("code", "eval", n)
    pairs = _encode_pairs(tok, items)
    outputs = greedy_generate(model, tok, [p for p, _ in pairs], max(len(a) for _, a in pairs) + 8, 64)
    table: dict[str, dict[str, int]] = {kind: {"items": 0, "wrong": 0} for kind, _ in CODE_KINDS}
    table["lists, max/min, conditionals"] = {"items": 0, "wrong": 0}
    for item, out in zip(items, outputs):
        row = table[code_kind(item.prompt)]
        row["items"] += 1
        row["wrong"] += out.strip() != item.answer.strip()
    return table


def score(key: str, n: int | None, weights: Path | None = None) -> dict:
    _, skills, new = bundled_model(key)
    model, tok = load_model(key, weights)
    t0 = time.perf_counter()
    res = evaluate_tasks(model, tok, [*skills, new], n=n, batch_size=64)
    record = training_record(Path(weights) if weights else BUNDLED[key]) or {}
    breakdown = code_breakdown(model, tok, n) if "code" in skills else None
    return {"skills": skills, "finetune_domain": new, "eval": res, "code_wrong_by_kind": breakdown,
            "weights": str(weights) if weights else "bundled", "seconds": round(time.perf_counter() - t0, 1),
            "calib_recorded": record.get("calib_split_eval", {}).get("accuracy", {}),
            "skill_token_shares": record.get("skill_token_shares"), "train_seconds": record.get("train_seconds"),
            "tokens_seen": record.get("tokens_seen"), "parameters": record.get("parameters"),
            "model_type": model.config.model_type, "threads": torch.get_num_threads()}


def markdown(results: dict) -> str:
    lines = ["### The bundled reference models' own scores", "",
             "`python benchmarks/reference_scores.py`: greedy exact match on each skill's eval split (the items no training "
             "step or probe saw) and, last, on the model's fine-tuning domain, which it was never trained on; in brackets the "
             "calib-split score its training.json recorded.", ""]
    for key, r in results.items():
        doms = [*r["skills"], r["finetune_domain"]]
        shares = r.get("skill_token_shares") or {}
        lines += [f"**{'reference' if key == 'reference' else 'reference-' + key}** ({r['model_type']}, {r['parameters'] or 0:,} parameters, "
                  f"{(r['tokens_seen'] or 0) / 1e6:.1f}M training tokens, {(r['train_seconds'] or 0) / 60:.0f} min of training)", "",
                  "| " + " | ".join(f"{d}" + (f" ({shares[d]:.1%})" if d in shares else " (never trained)" if d == r["finetune_domain"] else "")
                                    for d in doms) + " |",
                  "|" + "---|" * len(doms),
                  "| " + " | ".join(f"{r['eval']['accuracy'][d]:.3f}" + (f" [{r['calib_recorded'][d]:.3f}]" if d in r["calib_recorded"] else "")
                                    for d in doms) + " |", ""]
        if r.get("code_wrong_by_kind"):
            lines += ["Code items wrong by program kind (wrong / items): " + "; ".join(
                f"{kind} {v['wrong']}/{v['items']}" for kind, v in r["code_wrong_by_kind"].items()) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="one bundled model (default: every one whose weights are present)")
    ap.add_argument("--n", type=int, default=None, help="eval items per domain (default: 256)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--weights", type=Path, default=None, help="score these weights (a folder) as --model instead of the bundled ones")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/reference_scores.json; "
                    "any other path leaves the README alone)")
    args = ap.parse_args(argv)
    if args.weights is not None and (args.model is None or args.out is None):
        ap.error("--weights needs --model (which recipe they follow) and --out (they are not the bundled model's scores)")
    out = args.out or OUT
    torch.set_num_threads(args.threads)
    keys = [bundled_model(args.model)[0]] if args.model else [k for k, f in BUNDLED.items() if (f / "model.safetensors").is_file()]
    results = json.loads(out.read_text()) if out.is_file() else {}
    for key in keys:
        results[key] = score(key, args.n, args.weights)
        print(f"{key}: " + " ".join(f"{d}={a:.3f}" for d, a in results[key]["eval"]["accuracy"].items()), file=sys.stderr)
    results = {k: results[k] for k in BUNDLED if k in results}
    write_json(out, results)
    table = markdown(results)
    print(table)
    if out.resolve() == OUT.resolve():
        update_section("reference-scores", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
