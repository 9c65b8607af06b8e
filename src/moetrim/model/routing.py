"""Routing a model was fine-tuned to use: a per-layer router bias and always-active condenser experts.

`moetrim finetune` can leave two things in a model that stock `transformers` routers do not know:

* a bias b (one value per expert, no gradient) added to the router logits before the softmax, so it
  changes both which experts are picked and their weights (or, with `apply="selection"`, only which
  are picked, as DeepSeek-V3's balancing bias does);
* r *condenser* experts per layer that every token runs besides its routed experts. They are masked
  out of the routed top-k (so one never runs twice), and weighted either by their own routing
  probability (`gate="prob"`, renormalised with the routed weights when the family renormalises) or by
  a small learned gate sigmoid(w.h + beta) (`gate="learned"`).

Both are installed as a forward hook on the router module that rewrites its output
`(logits, top_k_weights, top_k_index)`; the experts module is called with the k' = k + r (budget
"additive") or k (budget "fixed": k - r routed + r condensers) columns it returns, which every fused
experts module accepts. The state lives in buffers (and, for the learned gate, parameters) on the
router, so it is saved with the weights; the record in config.json (`moetrim_routing`) says how to
rebuild it, and `model_type` changes so plain `transformers` refuses such a checkpoint instead of
silently routing without the bias.

Only routers that score experts with softmax -> top-k -> optional renormalisation (Qwen1.5/2/3-MoE,
OLMoE, Mixtral and their clones) can be rerouted; `install_routing` checks this by running the router
and comparing, and refuses others in one line.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from moetrim.errors import MoetrimError, UsageError
from moetrim.model.view import MoELayer, find_moe_layers

ROUTING_KEY = "moetrim_routing"
ROUTED_MODEL_TYPE = "moetrim_routed"
BIAS_APPLY = ("logits", "selection")
BUDGETS = ("additive", "fixed")
GATES = ("prob", "learned")


@dataclass
class RoutingSpec:
    """How a model's routers are rerouted: recorded in config.json under `moetrim_routing`."""

    bias: bool = False
    bias_apply: str = "logits"
    condensers: int = 0  # r per layer (0: none)
    budget: str = "additive"
    gate: str = "prob"
    normalise: bool | None = None  # whether the family renormalises top-k weights (probed at install)

    def check(self, top_k: int, num_experts: int) -> None:
        if self.bias_apply not in BIAS_APPLY:
            raise UsageError(f"unknown bias application {self.bias_apply!r}; choose {', '.join(BIAS_APPLY)}")
        if self.budget not in BUDGETS:
            raise UsageError(f"unknown condenser budget {self.budget!r}; choose {', '.join(BUDGETS)}")
        if self.gate not in GATES:
            raise UsageError(f"unknown condenser gate {self.gate!r}; choose {', '.join(GATES)}")
        r = self.condensers
        if not isinstance(r, int) or r < 0:
            raise UsageError(f"--condensers must be a whole number >= 0, got {r}")
        if r and r >= num_experts:
            raise UsageError(f"--condensers {r} must be fewer than the {num_experts} experts per layer")
        if r and self.budget == "fixed" and r >= top_k:
            raise UsageError(f"--budget fixed runs top_k - r = {top_k - r} routed experts; use r < top_k ({top_k}) or --budget additive")
        if r and num_experts - r < (top_k if self.budget == "additive" else top_k - r):
            raise UsageError(f"--condensers {r} leaves too few experts to route top-{top_k} among")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingSpec":
        if not isinstance(d, dict) or not set(d) <= set(cls.__dataclass_fields__):
            raise MoetrimError(f"config.json: {ROUTING_KEY} must be an object with fields {', '.join(cls.__dataclass_fields__)}")
        return cls(**d)

    @property
    def active(self) -> bool:
        return self.bias or self.condensers > 0


def _normalises(router: nn.Module) -> bool | None:
    flag = getattr(router, "norm_topk_prob", None)
    return None if flag is None else bool(flag)


def select_routed(logits: torch.Tensor, bias: torch.Tensor | None, bias_apply: str, condensers: torch.Tensor | None,
                  routed_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which experts a token is routed to: (biased logits in fp32, probabilities p [T, E], routed ids [T, routed_k]).

    The bias is added to the logits (so it moves p too) or, with bias_apply "selection", only to the
    scores top-k ranks; condensers are excluded from the ranking. Pure tensor ops without a host read,
    shared by the transformers router hook and the vLLM plugin's router (`integrations/vllm_plugin/routed.py`)."""
    raw = logits.float()
    biased = raw + bias if bias is not None and bias_apply == "logits" else raw
    p = biased.softmax(dim=-1)
    scores = p if bias is None or bias_apply == "logits" else p + bias
    if condensers is not None:
        scores = scores.index_fill(-1, condensers, float("-inf"))
    _, top_i = torch.topk(scores, routed_k, dim=-1)
    return biased, p, top_i


def weigh_routed(p: torch.Tensor, top_i: torch.Tensor, condensers: torch.Tensor | None, normalise: bool,
                 hidden: torch.Tensor, gate: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots' weights and ids (fp32 weights [T, k'], ids [T, k']): the routed experts' probabilities, and the
    condensers appended, weighted by their own probability (renormalised together with the routed ones when
    the family renormalises) or, with `gate` = (weight [r, H], bias [r]), by sigmoid(w.h + beta) (the routed
    weights renormalised among themselves)."""
    top_w = p.gather(-1, top_i)
    if condensers is None:
        return (top_w / top_w.sum(dim=-1, keepdim=True) if normalise else top_w), top_i
    top_i = torch.cat([top_i, condensers.to(top_i.dtype).expand(top_i.shape[0], -1)], dim=-1)
    if gate is not None:
        if normalise:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        g = torch.sigmoid(nn.functional.linear(hidden.to(gate[0].dtype), gate[0], gate[1]))
        return torch.cat([top_w, g.float()], dim=-1), top_i
    top_w = torch.cat([top_w, p.index_select(-1, condensers)], dim=-1)
    return (top_w / top_w.sum(dim=-1, keepdim=True) if normalise else top_w), top_i


class RouterPatch:
    """The forward hook of one router: rerouting with the bias and condensers of its buffers.

    `observer(p, selected, hidden)` (set by the trainer) sees, on every call, the router probabilities
    p [T, E] (biased when the bias applies to the logits) and the routed experts each token selected
    [T, k'] (condensers excluded); it decides itself whether the call counts (training forward, not a
    checkpoint recompute) and which of the two is the usage it balances or sparsifies."""

    def __init__(self, layer: MoELayer, spec: RoutingSpec, normalise: bool):
        self.layer = layer
        self.spec = spec
        self.normalise = normalise
        self.observer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
        self._cache: dict[str, tuple] = {}
        self.handle = layer.router.register_forward_hook(self)

    @property
    def router(self) -> nn.Module:
        return self.layer.router

    def routed_k(self, r: int) -> int:
        """Routed experts per token beside r condensers: k (budget additive) or k - r (fixed)."""
        k = int(self.router.top_k)
        return k if self.spec.budget == "additive" else k - r

    def _read(self, name: str, derive):
        """derive(buffer), recomputed only when the buffer was replaced or written in place: the hook
        runs in every forward, and reading a GPU buffer's values there would sync the device each time."""
        t = getattr(self.router, name, None)
        if t is None:
            return None
        ref, version, value = self._cache.get(name, (None, -1, None))
        if ref is None or ref() is not t or version != t._version:
            value = derive(t)
            self._cache[name] = (weakref.ref(t), t._version, value)
        return value

    def condensers(self) -> torch.Tensor | None:
        return self._read("moetrim_condensers", lambda c: None if c.numel() == 0 or int(c[0]) < 0 else c)

    def bias_active(self) -> bool:
        return bool(self._read("moetrim_bias", lambda b: bool(b.any())))

    def bias_flag(self) -> torch.Tensor | None:
        """Whether the bias is non-zero, as a tensor on its device (no host read), or None without a bias."""
        return self._read("moetrim_bias", lambda b: b.any())

    def __call__(self, router: nn.Module, args, output):
        logits, weights = output[0], output[1]
        bias = getattr(router, "moetrim_bias", None)
        cond = self.condensers()
        hidden = args[0].reshape(-1, self.layer.hidden_size)
        # While the trainer observes (the bias moves every step), whether the bias is zero is never read
        # back: the rewritten output is chosen over the stock one on the device (`torch.where` below).
        # Without an observer it is read once per change of the bias (cached), and a zero bias leaves the
        # router untouched.
        flag = None
        if cond is None and self.observer is not None:
            flag = self.bias_flag()
            active = flag is not None
        else:
            active = self.bias_active()
        if cond is None and not active and self.observer is None:
            return None  # nothing to change: the stock output, bit for bit
        routed_k = int(router.top_k) if cond is None else self.routed_k(cond.numel())
        biased, p, top_i = select_routed(logits, bias, self.spec.bias_apply, cond, routed_k)
        if self.observer is not None:
            self.observer(p, top_i, hidden)
        if cond is None and not active:
            return None
        gate = (router.moetrim_gate_weight, router.moetrim_gate_bias) if cond is not None and self.spec.gate == "learned" else None
        top_w, top_i = weigh_routed(p, top_i, cond, self.normalise, hidden, gate)
        if flag is not None:  # a zero bias gives the stock output, bit for bit, without a host read
            return (torch.where(flag, biased.to(logits.dtype), logits), torch.where(flag, top_w.to(weights.dtype), weights),
                    torch.where(flag, top_i, output[2]))
        return biased.to(logits.dtype), top_w.to(weights.dtype), top_i

    def remove(self) -> None:
        self.handle.remove()


def softmax_topk_renormalises(layer: MoELayer) -> bool | None:
    """Whether the router routes by softmax -> top-k and renormalises the top-k weights (True), does
    not renormalise (False), or routes some other way (None: sigmoid scores, group-limited or scaled
    weights). Runs the router on random input and compares with both readings."""
    router = layer.router
    w = layer.router_weight
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(64, layer.hidden_size, generator=gen).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out = router(h)
    if not isinstance(out, tuple) or len(out) != 3:
        return None
    logits, weights, index = out
    p = logits.float().softmax(dim=-1)
    top_w, top_i = torch.topk(p, int(router.top_k), dim=-1)
    declared = _normalises(router)
    for normalise in ([declared] if declared is not None else [False, True]):
        w_ = top_w / top_w.sum(-1, keepdim=True) if normalise else top_w
        if torch.equal(top_i, index) and torch.allclose(w_.to(weights.dtype).float(), weights.float(), atol=1e-5, rtol=1e-4):
            return normalise
    return None


def _probe_semantics(layer: MoELayer) -> bool:
    """softmax_topk_renormalises, or a UsageError in one line for a router that routes otherwise."""
    found = softmax_topk_renormalises(layer)
    if found is None:
        raise UsageError(f"layer {layer.index}: {type(layer.router).__name__} does not route by softmax then top-k; router bias "
                         "and condensers support Qwen-MoE, OLMoE and Mixtral-style routers (use --method full or esft)")
    return found


def install_routing(model: nn.Module, spec: RoutingSpec) -> list[RouterPatch]:
    """Give every MoE router the buffers of `spec` (zero bias, no condensers chosen yet) and its hook.

    Idempotent per model: a second call returns the patches already installed."""
    existing = getattr(model, "_moetrim_router_patches", None)
    if existing is not None:
        return existing
    layers = find_moe_layers(model)
    for layer in layers:
        spec.check(layer.top_k, layer.num_experts)
    if spec.normalise is None:  # a fresh install: read the family's routing off its routers
        found = {_probe_semantics(layer) for layer in layers}
        if len(found) != 1:
            raise UsageError("the MoE layers of this model route differently (some renormalise top-k weights); cannot reroute them")
        spec.normalise = found.pop()
    patches = []
    for layer in layers:
        normalise = spec.normalise
        router = layer.router
        dev = layer.router_weight.device
        if spec.bias:
            router.register_buffer("moetrim_bias", torch.zeros(layer.num_experts, dtype=torch.float32, device=dev))
        if spec.condensers:
            router.register_buffer("moetrim_condensers", torch.full((spec.condensers,), -1, dtype=torch.long, device=dev))
            if spec.gate == "learned":
                dtype = layer.router_weight.dtype
                router.moetrim_gate_weight = nn.Parameter(torch.zeros(spec.condensers, layer.hidden_size, dtype=dtype, device=dev))
                router.moetrim_gate_bias = nn.Parameter(torch.zeros(spec.condensers, dtype=dtype, device=dev))
        patches.append(RouterPatch(layer, spec, normalise))
    model._moetrim_router_patches = patches
    model.config.__dict__[ROUTING_KEY] = spec.to_dict()
    return patches


def router_patches(model: nn.Module) -> list[RouterPatch]:
    return getattr(model, "_moetrim_router_patches", None) or []


def choose_condensers(model: nn.Module, *, mean_gate: dict[int, torch.Tensor] | None = None,
                      usage: dict[int, torch.Tensor] | None = None) -> dict[int, list[int]]:
    """Make the r lowest-bias experts of each layer its condensers (the suppressed tail); returns them.

    The bias moves in equal steps, so experts often tie; ties go to the least used (`usage`, e.g. the
    routing probability summed over the sparsifying phase), then to the lowest id.

    With a learned gate, its bias starts at logit(mean routing probability) of each condenser when
    `mean_gate` gives those probabilities, so the condensers start at the weight the router gave them."""
    chosen = {}
    for patch in router_patches(model):
        router = patch.router
        r = patch.spec.condensers
        bias = getattr(router, "moetrim_bias", None)
        if bias is None:
            raise MoetrimError("condensers are chosen by the router bias; this model has none")
        b = bias.detach().cpu()
        order = torch.arange(b.numel())
        if usage is not None and patch.layer.index in usage:
            order = torch.sort(usage[patch.layer.index].cpu(), stable=True).indices
        order = order[torch.sort(b[order], stable=True).indices][:r]
        ids = sorted(int(i) for i in order)
        router.moetrim_condensers.copy_(torch.tensor(ids, dtype=torch.long))
        router.moetrim_routed_k = patch.routed_k(r)
        if patch.spec.gate == "learned" and mean_gate is not None:
            p = mean_gate[patch.layer.index][ids].clamp(1e-4, 1 - 1e-4)
            with torch.no_grad():
                router.moetrim_gate_bias.copy_(torch.log(p / (1 - p)).to(router.moetrim_gate_bias.dtype))
        chosen[patch.layer.index] = ids
    return chosen


def condenser_ids(model: nn.Module) -> dict[int, list[int]]:
    out = {}
    for patch in router_patches(model):
        c = patch.condensers()
        if c is not None:
            out[patch.layer.index] = [int(i) for i in c]
    return out


def restore_routing(model: nn.Module, record: dict) -> list[RouterPatch]:
    """Rebuild the routing of a loaded checkpoint's record (buffers to be filled by its weights)."""
    spec = RoutingSpec.from_dict(record)
    patches = install_routing(model, spec)
    return patches


def after_load(model: nn.Module) -> None:
    """Set what follows from loaded buffers (a checkpoint, or a resumed run's): the routed width that
    routing statistics read beside the chosen condensers."""
    for patch in router_patches(model):
        c = patch.condensers()
        if c is not None:
            patch.router.moetrim_routed_k = patch.routed_k(c.numel())
