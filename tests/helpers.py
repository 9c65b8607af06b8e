"""Test-only references that do not go through moetrim's own code paths."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from moetrim.model.view import find_moe_layers


def run_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


class _MaskRouterLogits(TorchFunctionMode):
    """Adds -inf to the router logits of removed experts inside the stock router's own forward."""

    def __init__(self, masks: dict[int, torch.Tensor]):
        super().__init__()
        self.masks = masks  # data_ptr of router weight -> additive mask [E]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            mask = self.masks.get(args[1].data_ptr())
            if mask is not None:
                out = out + mask.to(out.dtype)
        return out


def masked_model_logits(model, plan, ids):
    """Logits of the ORIGINAL model with the plan's removals masked, not sliced:
    removed dims -> their down-projection columns zeroed; removed experts -> router logits -inf
    (and any selection bias -inf), so they are never selected."""
    m = copy.deepcopy(model)
    masks = {}
    for layer in find_moe_layers(m):
        lp = next(p for p in plan.layers if p.layer == layer.index)
        removed = [e for e in range(layer.num_experts) if e not in lp.kept_experts]
        with torch.no_grad():
            if lp.kept_dims is not None:
                for e, dims in zip(lp.kept_experts, lp.kept_dims):
                    w = layer.expert(e)
                    drop = [j for j in range(w.width) if j not in set(dims)]
                    w.down[:, drop] = 0
            if removed:
                add = torch.zeros(layer.num_experts)
                add[removed] = float("-inf")
                masks[layer.router_weight.data_ptr()] = add
                for module, name, axis in layer.expert_indexed_tensors():  # selection biases
                    t = getattr(module, name)
                    if t is not layer.router_weight and t.is_floating_point() and t.shape[axis] == layer.num_experts:
                        if name != "bias":  # an additive logit bias (GPT-OSS) is covered by the logit mask
                            t.index_fill_(axis, torch.tensor(removed), float("-inf"))
    with _MaskRouterLogits(masks):
        return run_logits(m, ids)


def plain_transformers_error(path) -> str:
    """What `AutoModelForCausalLM.from_pretrained(path)` says in a process that never imported moetrim
    ('' if it loaded): plain transformers must refuse moetrim's own formats, not load random experts."""
    import subprocess
    import sys

    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\nexcept Exception as e:\n    print(e)\n"
            "assert 'moetrim' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert r.returncode == 0, r.stderr[-500:]
    return r.stdout


def auto_equals_moetrim_load(path, ids) -> bool:
    """With moetrim imported, the Auto classes load a moetrim checkpoint by path exactly as moetrim.load does."""
    import moetrim
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(path)
    return torch.equal(run_logits(auto, ids), run_logits(moetrim.load(path), ids))


def mixed_auto_plan(model, profile):
    """An auto plan that mixes both kinds of layer, built by hand: layer 1 half novices (MoNE), every other
    layer trimmed (dims, 50% in each layer), the way `make_auto_plan` writes a mixed choice."""
    import dataclasses

    from moetrim.plan import LayerPlan, make_plan
    from moetrim.plan.replace import stored_params

    layers = find_moe_layers(model)
    dims = make_plan(model, profile, granularity="dims", ratio=0.5, allocation="layer")
    novices = make_plan(model, profile, granularity="novice", ratio=0.5)
    l1 = layers[1]
    whole = LayerPlan(1, l1.num_experts, l1.widths[0], l1.top_k, list(range(l1.num_experts)), [l1.widths[0]] * l1.num_experts, None)
    after = stored_params(l1, novices.layers[1]) + sum(l.params_at(p.widths) for l, p in zip(layers, dims.layers) if l.index != 1)
    rows = [whole if p.layer == 1 else p for p in dims.layers]
    return dataclasses.replace(dims, granularity="auto", criterion="auto", layers=rows, replaced_layers=[novices.layers[1]],
                               params_after=after), dims, novices


BENCHMARKS = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str):
    """A fixture body: import benchmarks/NAME.py (with benchmarks/ on sys.path while the tests use it)."""
    import importlib
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
