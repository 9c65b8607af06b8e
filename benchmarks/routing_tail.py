"""Where a bundled model routes its rare skills' tokens: the experts they use most, per layer, against common text.

For each rare skill (at most 3% of the training tokens, as the model's training.json records) and each
MoE layer: the experts that take the largest share of the skill's routed slots (as many as the
router's top-k), their share of the skill's slots, and the share of the same experts on common text
(the calib split of the other skills, mixed). A rare skill concentrated on experts that common text
hardly uses is what pruning by usage would remove first, and what the condenser method keeps.

    python benchmarks/routing_tail.py --model longtail          # calib split, 128 items per skill

Writes benchmarks/results/routing_tail-longtail.json and a table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import bundled_model, for_model, section, update_section, write_json  # noqa: E402

import moetrim  # noqa: E402
from moetrim.assets import BUNDLED, training_record  # noqa: E402
from moetrim.data.tasks import calibration_texts  # noqa: E402
from moetrim.evaluate.routing import routing_health  # noqa: E402

DEFAULT_OUT = HERE / "results" / "routing_tail.json"
RARE = 0.03  # a skill with at most this share of the training tokens is rare


def shares(model, tok, texts: list[str], max_tokens: int) -> list[list[float]]:
    """Per MoE layer, the share of routed slots each expert takes on these texts."""
    return [layer["token_share"] for layer in routing_health(model, tok, texts, max_tokens=max_tokens)["layers"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="longtail", help="a bundled model (its training.json gives the skills and their shares)")
    ap.add_argument("--items", type=int, default=128, help="calib items per skill")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    key, skills, _ = bundled_model(args.model)
    record = training_record(BUNDLED[key]) or {}
    token_shares = record.get("skill_token_shares") or record.get("hyperparameters", {}).get("token_shares") or {}
    rare = [d for d in skills if token_shares.get(d, 1.0) <= RARE]
    if not rare:
        print(f"{key}: no skill has at most {RARE:.0%} of the training tokens in its training.json", file=sys.stderr)
        return 2
    common = [d for d in skills if d not in rare]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = moetrim.reference_model(key)
    top_k = model.config.num_experts_per_tok
    base = shares(model, tok, calibration_texts(common, n_per_domain=args.items), max_tokens=50_000)
    rows = []
    for skill in rare:
        own = shares(model, tok, calibration_texts([skill], n_per_domain=args.items), max_tokens=20_000)
        for layer, (mine, theirs) in enumerate(zip(own, base)):
            top = sorted(range(len(mine)), key=lambda e: (-mine[e], e))[:top_k]
            rows.append({"skill": skill, "layer": layer, "experts": top, "skill_share": sum(mine[e] for e in top),
                         "common_share": sum(theirs[e] for e in top), "uniform_share": top_k / len(mine)})
    result = {"meta": {"model": key, "items_per_skill": args.items, "rare": rare, "common": common, "top_k": top_k,
                       "token_shares": token_shares, "seconds": round(time.perf_counter() - t0, 1)}, "rows": rows}
    out = args.out or for_model(DEFAULT_OUT, key)
    write_json(out, result)
    table = markdown(result)
    print(table)
    if args.out is None:
        update_section(section("routing-tail", key), table)
    return 0


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"### Where {meta['model']}'s rare skills route (calib split, {meta['items_per_skill']} items per skill)", "",
             f"`python benchmarks/routing_tail.py --model {meta['model']}` ({meta['seconds']:.0f} s). Per layer, the {meta['top_k']} "
             "experts that take most of a rare skill's routed slots: their share of the skill's slots and of common text's "
             f"(the other skills' calib text); uniform routing would give {meta['top_k']} / experts.", "",
             "| skill (token share) | layer | experts | share on the skill | share on common text |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['skill']} ({meta['token_shares'].get(r['skill'], 0):.1%}) | {r['layer']} | {', '.join(map(str, r['experts']))} | "
                     f"{r['skill_share']:.3f} | {r['common_share']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
