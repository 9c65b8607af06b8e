#!/usr/bin/env python
"""Check moetrim's `camera` dimension criterion against the CAMERA authors' own scoring code, on a bundled model.

It is not vendored (their code stays theirs), so give a clone of xuyuzhuang11/CAMERA:

    git clone https://github.com/xuyuzhuang11/CAMERA /tmp/CAMERA
    python scripts/check_camera_against_authors.py /tmp/CAMERA [--model longtail] [--ratio 0.5] [--as-written]

What runs: moetrim calibrates the model (forward only) on its trained domains' calibration texts, and a
forward pre-hook on each MoE block records the block's input on those same tokens. Their `mei.MEI` then
runs unchanged on the CPU: `MEI(module, "cpu", tp, batch_size=1, shape=(1, N, H))`, `add_batch` with the
N recorded hidden states [1, N, H], and `est_importance(reduce_ratio=alpha)` (their run.sh: 0.90), with
tp = "qwen3" for the Qwen3-MoE model and "qwen2" for the Qwen2-MoE one. What we feed it as `module`
is a stand-in, because their code reads the per-expert nn.Linear modules of transformers 4
(`module.experts[e].gate_proj.weight`, ...) while transformers 5 fuses them: `gate.weight` is the router
weight [E, H]; `experts[e].gate_proj.weight` / `.up_proj.weight` are the first / last I rows of
`gate_up_proj[e]` [2I, H] and `experts[e].down_proj.weight` is `down_proj[e]` [H, I] (views, not copies);
`top_k` is the router's; for Qwen2-MoE `shared_expert` and `shared_expert_gate` are the model's own modules.
Their code imports faiss without using it; when faiss is missing an empty module stands in for it.

Their "qwen3" branch hard-codes `torch.topk(..., k=8)` for the routing weight (right for Qwen3-30B-A3B,
wrong for a model routing to another number of experts). By default torch.topk is patched for the length
of the call so that k is the model's top_k; --as-written runs it with k = 8 (expected to disagree when
top_k != 8). Their "qwen2" branch reads `module.top_k` and needs no patch.

Their pipeline (qwen3.py / qwen2.py) scores layer i on the outputs of layers already pruned; here both
score the unpruned model's block inputs: this checks the score, not that sequential schedule. Their
"qwen2" branch also ranks the shared expert's dimensions jointly with the routed ones (moetrim scores only
routed experts): the routed part of their vector is compared, and the line says how many shared-expert
dimensions their joint ranking would remove at the ratio.

Per MoE layer it prints the largest |theirs - ours| relative to the layer's largest score, and whether both
remove the same dimensions at the ratio (the int(ratio * E * I) lowest, ranked over the layer as their
`make_pruned_module` does). Exit 1 when a layer disagrees.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from pathlib import Path

import torch


class _Linear:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight


def _stand_in(layer, tp: str):
    """What their MEI reads of a transformers-4 sparse MoE block, built from a transformers-5 one."""
    gate_up = layer.experts.gate_up_proj.detach()  # [E, 2I, H]: gate rows first, then up rows
    down = layer.experts.down_proj.detach()  # [E, H, I]
    width = gate_up.shape[1] // 2
    experts = [
        types.SimpleNamespace(gate_proj=_Linear(gate_up[e, :width]), up_proj=_Linear(gate_up[e, width:]), down_proj=_Linear(down[e]))
        for e in range(gate_up.shape[0])
    ]
    router = layer.router_weight.detach()
    module = types.SimpleNamespace(gate=_Linear(router), experts=experts, top_k=layer.top_k, parameters=lambda: iter([router]))
    if tp == "qwen2":
        module.shared_expert = layer.block.shared_expert
        module.shared_expert_gate = layer.block.shared_expert_gate
    return module


@contextlib.contextmanager
def _topk_as(k: int | None):
    """torch.topk with its k replaced (their qwen3 branch's one call to it), or unchanged when k is None."""
    if k is None:
        yield
        return
    original = torch.topk

    def patched(input, k_ignored=None, *args, **kwargs):
        kwargs.pop("k", None)
        return original(input, k, *args, **kwargs)

    torch.topk = patched
    try:
        yield
    finally:
        torch.topk = original


def _pruned(scores: torch.Tensor, n: int) -> set[int]:
    return set(torch.topk(scores.flatten(), n, largest=False).indices.tolist())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clone", type=Path, help="a clone of github.com/xuyuzhuang11/CAMERA")
    ap.add_argument("--model", default="longtail", help="bundled model (reference or longtail)")
    ap.add_argument("--ratio", type=float, default=0.5, help="share of each layer's routed dimensions removed")
    ap.add_argument("--alpha", type=float, default=0.9, help="their reduce_ratio / our alpha (run.sh: 0.90)")
    ap.add_argument("--n-per-domain", type=int, default=8, help="calibration texts per trained domain")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--as-written", action="store_true", help="keep their qwen3 branch's hard-coded top-8 routing")
    ap.add_argument("--tol", type=float, default=1e-5, help="largest |theirs - ours| / max ours accepted")
    args = ap.parse_args(argv)
    if not (args.clone / "mei.py").is_file():
        ap.error(f"{args.clone} has no mei.py: give a clone of xuyuzhuang11/CAMERA")
    try:
        import faiss  # noqa: F401  (imported by mei.py, never used there)
    except ImportError:
        sys.modules["faiss"] = types.ModuleType("faiss")
    sys.path.insert(0, str(args.clone))
    import mei as theirs

    import moetrim
    from moetrim import criteria
    from moetrim.assets import BUNDLED, bundled_name, trained_domains
    from moetrim.calibrate import calibrate
    from moetrim.data.tasks import DOMAINS, calibration_texts
    from moetrim.model.view import find_moe_layers

    key = args.model if args.model in BUNDLED else bundled_name(args.model)
    if key is None:
        ap.error(f"--model: {args.model!r} is not a bundled model; choose one of {', '.join(BUNDLED)}")
    model, tok = moetrim.reference_model(key)
    model.float().eval()
    tp = {"qwen3_moe": "qwen3", "qwen2_moe": "qwen2"}.get(model.config.model_type)
    if tp is None:
        ap.error(f"{model.config.model_type}: this check knows their qwen3 and qwen2 branches only")
    layers = find_moe_layers(model)

    inputs: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
    hooks = [layer.block.register_forward_pre_hook(lambda _m, a, i=layer.index: inputs[i].append(a[0].detach().reshape(-1, a[0].shape[-1]).clone()))
             for layer in layers]
    try:
        texts = calibration_texts(trained_domains(BUNDLED[key]) or list(DOMAINS), n_per_domain=args.n_per_domain, seed=0)
        profile = calibrate(model, texts, tokenizer=tok, seq_len=args.seq_len, batch_size=args.batch_size, seed=0, fisher=False)
    finally:
        for h in hooks:
            h.remove()

    k = None if args.as_written or tp != "qwen3" else layers[0].top_k
    n_tokens = sum(t.shape[0] for t in inputs[layers[0].index])
    print(f"{args.model}: {n_tokens} calibration tokens; their MEI tp={tp!r}, routing top-k {8 if tp == 'qwen3' and k is None else layers[0].top_k}, "
          f"alpha {args.alpha}")
    bad = 0
    for layer in layers:
        x = torch.cat(inputs[layer.index])
        assert x.shape[0] == int(profile.get(layer.index, "tokens").item()), "hooked tokens differ from the profile's"
        m = theirs.MEI(_stand_in(layer, tp), "cpu", tp=tp, batch_size=1, shape=(1, *x.shape))
        m.add_batch(x[None], None)
        with torch.no_grad(), _topk_as(k):
            full = m.est_importance(reduce_ratio=args.alpha).double()
        E, width = layer.num_experts, layer.widths[0]
        n_shared = full.numel() - E * width
        their = full[n_shared:].view(E, width)
        ours = criteria.score("camera", "dim", profile, layer, alpha=args.alpha)
        diff = float((their - ours).abs().max() / ours.abs().max())
        n_prune = int(args.ratio * E * width)
        same = _pruned(their, n_prune) == _pruned(ours, n_prune)
        extra = ""
        if n_shared:
            joint = _pruned(full, int(args.ratio * full.numel()))
            extra = f"; their joint ranking removes {sum(i < n_shared for i in joint)} of the shared expert's {n_shared} dims"
        print(f"layer {layer.index}: max |theirs - ours| / max ours = {diff:.2e}; same dims kept at {args.ratio:.0%}: {same}{extra}")
        bad += not same or diff > args.tol
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
