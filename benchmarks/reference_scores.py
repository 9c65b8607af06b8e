"""The bundled reference models' own scores: eval-split accuracy on every skill each was trained on, and on its
fine-tuning domain (which it never saw), beside the calib-split scores its training recorded.

    python benchmarks/reference_scores.py                     # every bundled model whose weights are present
    python benchmarks/reference_scores.py --model longtail

Writes benchmarks/results/reference_scores.json (one entry per model, others kept) and a table in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import bundled_model, update_section, write_json  # noqa: E402

import moetrim  # noqa: E402
from moetrim.assets import BUNDLED, training_record  # noqa: E402
from moetrim.evaluate.tasks_eval import evaluate_tasks  # noqa: E402

OUT = HERE / "results" / "reference_scores.json"


def score(key: str, n: int | None) -> dict:
    _, skills, new = bundled_model(key)
    model, tok = moetrim.reference_model(key)
    t0 = time.perf_counter()
    res = evaluate_tasks(model, tok, [*skills, new], n=n, batch_size=64)
    record = training_record(BUNDLED[key]) or {}
    return {"skills": skills, "finetune_domain": new, "eval": res, "seconds": round(time.perf_counter() - t0, 1),
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
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="one bundled model (default: every one whose weights are present)")
    ap.add_argument("--n", type=int, default=None, help="eval items per domain (default: 256)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keys = [bundled_model(args.model)[0]] if args.model else [k for k, f in BUNDLED.items() if (f / "model.safetensors").is_file()]
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for key in keys:
        results[key] = score(key, args.n)
        print(f"{key}: " + " ".join(f"{d}={a:.3f}" for d, a in results[key]["eval"]["accuracy"].items()), file=sys.stderr)
    results = {k: results[k] for k in BUNDLED if k in results}
    write_json(OUT, results)
    table = markdown(results)
    print(table)
    update_section("reference-scores", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
