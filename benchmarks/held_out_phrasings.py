"""Math accuracy on the eval items asked in held-out phrasings against those asked in training phrasings.

Half of the eval math items use a phrasing no training item uses (a new combination of known verbs,
see `moetrim.data.tasks`). Equal accuracy on both halves means the model reads the operation from the
words rather than recognising a memorised template.

    python benchmarks/held_out_phrasings.py reference
    python benchmarks/held_out_phrasings.py --model longtail     # (a bundled model by name, or a model directory)
"""

from __future__ import annotations

import re
import sys

import torch

import moetrim
from moetrim.data import tasks
from moetrim.evaluate.tasks_eval import _encode_pairs, greedy_generate


def phrasing_of(prompt: str) -> str | None:
    """The template a math prompt was written from."""
    for phrasings in tasks._MATH_PHRASINGS:
        for template in phrasings:
            pattern = re.escape(template)
            for slot, rx in (("n", r"\w+"), ("a", r"\d+"), ("b", r"\d+"), ("c", r"\d+"), ("o", r"\w+")):
                pattern = pattern.replace(r"\{" + slot + r"\}", rx)
            if re.fullmatch("Q: " + pattern + "\nA:", prompt):
                return template
    return None


def main(argv: list[str]) -> int:
    import argparse

    from moetrim.assets import BUNDLED

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", default=None, help="model directory or bundled name (default: reference)")
    ap.add_argument("--model", default=None, help="a bundled model: reference or longtail (also reference-longtail)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    path = args.model or args.path or "reference"
    if path in BUNDLED and path != "reference":
        path = f"reference-{path}"  # moetrim.load resolves bundled names
    torch.set_num_threads(args.threads)
    model, tok = moetrim.load(path), moetrim.load_tokenizer(path)
    held = {t for ps in tasks._MATH_HELD_OUT_PHRASINGS for t in ps}
    items = tasks.get_items("math", "eval")
    groups = {"held-out phrasings": [i for i in items if phrasing_of(i.prompt) in held],
              "training phrasings": [i for i in items if phrasing_of(i.prompt) not in held]}
    for name, group in groups.items():
        pairs = _encode_pairs(tok, group)
        outs = greedy_generate(model, tok, [p for p, _ in pairs], 48, 64)
        acc = sum(o.strip() == i.answer for o, i in zip(outs, group)) / len(group)
        print(f"{name}: {acc:.3f} on {len(group)} items")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
