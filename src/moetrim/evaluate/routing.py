"""Routing health: how a model spreads tokens over its experts, measured as it actually runs.

Fine-tuning an MoE on a narrow domain can collapse its routing (a few experts take every token, the
rest die, and the long tail of skills they held goes with them) or move it far from the base model.
`routing_health` shows both per MoE layer, from forward hooks on the routers: it reads what each
router returns, after any hook installed before it (moetrim's fine-tuning bias and condensers) has
rewritten it, so the figures are the routing the experts really get.

Condenser experts (always active, added by `moetrim finetune`) are not routing choices: a router
with ``moetrim_routed_k`` routes only its first that many columns of ``top_k_index``; the rest are
condensers, reported per layer and left out of the shares and of every balance figure.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Sequence

import torch
from torch import nn

from moetrim.calibrate.run import model_context
from moetrim.data.text import batches, token_chunks
from moetrim.errors import MoetrimError, UsageError
from moetrim.model.view import MoELayer, find_moe_layers

DEAD_SHARE = 0.1  # an expert is dead below DEAD_SHARE / E of a layer's routed slots
TOP_FRACTION = 0.1  # "top-10% share": the slots taken by the busiest ceil(0.1 E) experts


def share_statistics(shares: Sequence[float], experts: Sequence[int] | None = None) -> dict:
    """Balance of one layer's token shares over `experts` (default: all of them).

    entropy: H(f) / log E, 1 for uniform routing, 0 when one expert takes every slot; gini: 0 uniform,
    (E-1)/E for one expert; dead: experts under DEAD_SHARE / E; top10_share: slots of the busiest
    ceil(0.1 E) experts."""
    ids = list(range(len(shares))) if experts is None else list(experts)
    f = torch.tensor([float(shares[e]) for e in ids], dtype=torch.float64)
    n, total = len(ids), float(f.sum())
    if n == 0 or total <= 0:
        raise MoetrimError("no routed tokens to measure")
    f = f / total
    nz = f[f > 0]
    entropy = float(-(nz * nz.log()).sum()) / math.log(n) if n > 1 else 1.0
    x = f.sort().values
    gini = float(2 * (torch.arange(1, n + 1, dtype=torch.float64) * x).sum() / n - (n + 1) / n)
    dead = [e for e, v in zip(ids, f.tolist()) if v < DEAD_SHARE / n]
    top = math.ceil(TOP_FRACTION * n)
    return {"entropy": entropy, "gini": max(gini, 0.0), "dead": len(dead), "dead_experts": dead,
            "top10_share": float(x[-top:].sum())}


class _RouterTap:
    """Forward hooks that keep, per MoE layer, what its router returned in the last forward pass:
    (logits [T, E] as float, routed index [T, k], condenser columns [T, k' - k])."""

    def __init__(self, layers: list[MoELayer]):
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.handles = [l.router.register_forward_hook(functools.partial(self._hook, l.index)) for l in layers]

    def _hook(self, layer: int, router: nn.Module, args, output) -> None:
        if not (isinstance(output, tuple) and len(output) >= 3 and all(isinstance(t, torch.Tensor) for t in output[:3])):
            raise MoetrimError(f"the router of layer {layer} ({type(router).__name__}) does not return "
                               "(logits, weights, index); moetrim cannot read its routing")
        logits, index = output[0], output[2]
        index = index.reshape(-1, index.shape[-1])
        k = int(getattr(router, "moetrim_routed_k", index.shape[1]))
        self.seen[layer] = (logits.detach().float().reshape(index.shape[0], -1), index[:, :k].detach(), index[:, k:].detach())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _Tally:
    """Sums over the tokens one layer routed: slots and router probability per expert, and against
    the base, KL and top-k overlap."""

    def __init__(self, experts: int):
        self.experts = experts
        self.counts = torch.zeros(experts, dtype=torch.float64)
        self.prob_sum = torch.zeros(experts, dtype=torch.float64)
        self.base_counts = torch.zeros(experts, dtype=torch.float64)
        self.tokens = self.k = 0
        self.kl_sum = self.overlap_sum = 0.0
        self.condensers: set[int] = set()

    def add(self, logits: torch.Tensor, index: torch.Tensor, extra: torch.Tensor) -> None:
        self.tokens += logits.shape[0]
        self.k = index.shape[1]
        self.counts += _slot_counts(index, self.experts)
        self.prob_sum += logits.softmax(-1).sum(0).double().cpu()
        self.condensers.update(int(e) for e in extra.unique().tolist())

    def add_base(self, logits: torch.Tensor, index: torch.Tensor, base_logits: torch.Tensor, base_index: torch.Tensor) -> None:
        lp, lq = logits.log_softmax(-1), base_logits.float().log_softmax(-1)
        p = lp.exp()
        self.kl_sum += float(torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum())
        mine = torch.zeros_like(p).scatter_(1, index.long(), 1.0)
        theirs = torch.zeros_like(p).scatter_(1, base_index.long(), 1.0)
        self.overlap_sum += float((mine * theirs).sum()) / max(index.shape[1], base_index.shape[1])
        self.base_counts += _slot_counts(base_index, self.experts)


def _slot_counts(index: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.bincount(index.reshape(-1).long().cpu(), minlength=experts)[:experts].double()


def _moe_layers(model: nn.Module, what: str) -> list[MoELayer]:
    try:
        return find_moe_layers(model)
    except MoetrimError as exc:
        raise UsageError(f"{what}: {exc}") from None


def _check_same_structure(layers: list[MoELayer], base_layers: list[MoELayer], model: nn.Module, base: nn.Module) -> None:
    shape = [(l.index, l.num_experts) for l in layers]
    base_shape = [(l.index, l.num_experts) for l in base_layers]
    if shape != base_shape:
        def says(s):
            return f"{len(s)} MoE layers of {'/'.join(sorted({str(e) for _, e in s}))} experts at layers {[i for i, _ in s]}"
        raise UsageError(f"--base has {says(base_shape)}, the model {says(shape)}; --base needs the same MoE layers "
                         "and experts (e.g. the model a fine-tune started from)")
    vocab, base_vocab = model.get_input_embeddings().num_embeddings, base.get_input_embeddings().num_embeddings
    if vocab != base_vocab:
        raise UsageError(f"--base has a vocabulary of {base_vocab} tokens, the model {vocab}; they do not read the same tokens")


def _route(model: nn.Module, tap: _RouterTap, ids: torch.Tensor, layers: list[MoELayer]) -> dict:
    device = next(model.parameters()).device
    ids = ids.to(device)
    tap.seen.clear()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    missing = [l.index for l in layers if l.index not in tap.seen]
    if missing:
        raise MoetrimError(f"the routers of MoE layers {missing} did not run in the forward pass")
    return tap.seen


def _layer_report(layer: MoELayer, tally: _Tally, condensers: set[int], with_base: bool) -> dict:
    E = layer.num_experts
    share = (tally.counts / tally.counts.sum()).tolist()
    routable = [e for e in range(E) if e not in condensers]
    report = {"layer": layer.index, "experts": E, "top_k": tally.k, "condensers": sorted(condensers),
              **share_statistics(share, routable), "token_share": share,
              "mean_prob": (tally.prob_sum / tally.tokens).tolist()}
    if with_base:
        report["kl_to_base"] = tally.kl_sum / tally.tokens
        report["topk_overlap"] = tally.overlap_sum / tally.tokens
        report["base_token_share"] = (tally.base_counts / tally.base_counts.sum()).tolist()
    return report


def _condenser_ids(router: nn.Module) -> set[int]:
    ids = getattr(router, "moetrim_condensers", None)
    if ids is None:
        return set()
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return {int(e) for e in values if int(e) >= 0}


@torch.inference_mode()
def routing_health(
    model: nn.Module,
    tokenizer,
    data: str | os.PathLike | Sequence[str],
    *,
    base: nn.Module | None = None,
    seq_len: int = 256,
    max_tokens: int | None = 20_000,
    batch_size: int = 8,
) -> dict:
    """Per-layer routing statistics of `model` on `data` (a .txt/.jsonl path, comma-separated paths, or
    strings), JSON-ready: token share and mean router probability (softmax of the logits) per expert,
    normalised entropy, Gini, dead experts, top-10% share; with `base` (same MoE layers and experts) on
    the same tokens, the mean per-token KL(p_model || p_base) of the router softmax and the mean top-k
    overlap |S_model ∩ S_base| / k. ``summary`` holds the means over layers (dead: the total).
    What `moetrim routing` prints: whether fine-tuning or compressing left experts idle or the
    routing collapsed, before any task score shows it.

    >>> report = moetrim.routing_health(tuned, tok, "data.txt", base=original)
    >>> report["summary"]["dead"], report["summary"]["kl_to_base"]
    (0, 0.0123)
    """
    layers = _moe_layers(model, "the model")
    base_layers = None
    if base is not None:
        base_layers = _moe_layers(base, "--base")
        _check_same_structure(layers, base_layers, model, base)
    context = model_context(model)
    if context:
        seq_len = min(seq_len, context)
    chunks = token_chunks(data, tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    if not chunks:
        raise UsageError("routing data is empty: no sequence of at least 2 tokens")
    tallies = {l.index: _Tally(l.num_experts) for l in layers}
    models = [m for m in (model, base) if m is not None]
    modes = [m.training for m in models]
    taps = [_RouterTap(layers)] + ([_RouterTap(base_layers)] if base_layers else [])
    try:
        for m in models:
            m.eval()
        # Equal-length chunks stack without padding (a short last chunk is a batch of its own), so
        # every position the routers see is a real token.
        for ids in batches(chunks, batch_size):
            seen = _route(model, taps[0], ids, layers)
            for idx, (logits, index, extra) in seen.items():
                tallies[idx].add(logits, index, extra)
            if base is not None:
                base_seen = _route(base, taps[1], ids, base_layers)
                for idx, (logits, index, _) in seen.items():
                    tallies[idx].add_base(logits, index, base_seen[idx][0], base_seen[idx][1])
    finally:
        for tap in taps:
            tap.close()
        for m, mode in zip(models, modes):
            m.train(mode)
    reports = [_layer_report(l, tallies[l.index], tallies[l.index].condensers | _condenser_ids(l.router), base is not None)
               for l in layers]
    summary = {key: sum(r[key] for r in reports) / len(reports) for key in ("entropy", "gini", "top10_share")}
    summary["dead"] = sum(r["dead"] for r in reports)
    if base is not None:
        summary.update({key: sum(r[key] for r in reports) / len(reports) for key in ("kl_to_base", "topk_overlap")})
    return {"tokens": sum(int(c.numel()) for c in chunks), "sequences": len(chunks), "seq_len": seq_len,
            "summary": summary, "layers": reports}
