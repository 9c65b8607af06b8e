"""Variable-width expert storage -> the per-expert / per-group tensors a serving engine loads.

Pure torch (no vLLM import), so it is unit-tested where vLLM is not installed. A moetrim variable-width
layer stores its routed experts packed (see `moetrim.model.varwidth`):

    mlp.experts.gate_up      [sum(2 * I_b), H]   block b: its I_b gate rows, then its I_b up rows
    mlp.experts.down_blocks  [H * sum(I_b)]      block b: H * I_b elements, viewed as [H, I_b]

with blocks sorted widest first ("by_width", ties in expert order) or in expert order ("by_expert").
Serving engines want one fused-MoE tensor set per layer (`w13 [E, 2I, H]`, `w2 [E, H, I]`) of a single
width I, or per-expert `gate_proj` / `up_proj` / `down_proj` tensors they stack themselves. This module
does that translation: per expert (exact widths), per width group (experts whose width rounds up to
the same multiple of `align` share one fused instance; the narrower ones are zero-padded, which
changes nothing: a zero gate and up row gives act(0) * 0 = 0 and meets a zero down column), or padded
to the layer's widest expert (the labelled fallback).

`group_plan` and `grouped_forward` are the grouped serving path's computation, kept here so it is tested
without vLLM: route once over all the layer's experts, then for each width group gather the (token, slot)
rows routed into it, run that group's experts top-1 (local ids, the slot's routing weight), and add the
rows back into [T, H]. Every routed hit is computed once, at its group's width.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from moetrim.model.varwidth import VARWIDTH_KEY
from moetrim.model.varwidth import LAYOUTS, block_order
_PACKED = re.compile(r"^(?P<layer>.*\.layers\.(?P<index>\d+)\.)mlp\.experts\.(?P<what>gate_up|down_blocks)$")


class LayoutError(ValueError):
    """The checkpoint's variable-width record or tensors are not what this unpacker reads."""


@dataclass(frozen=True)
class LayerLayout:
    """One MoE layer of a variable-width checkpoint: widths by expert id (router order), top-k, layout."""

    widths: tuple[int, ...]
    top_k: int
    layout: str = "by_width"

    @property
    def num_experts(self) -> int:
        return len(self.widths)

    @property
    def uniform_width(self) -> int | None:
        """The layer's one width if all its experts share it (served natively), else None."""
        return self.widths[0] if len(set(self.widths)) == 1 else None

    def expert_of_block(self) -> list[int]:
        """Which expert each stored block holds (the order moetrim writes)."""
        return block_order(self.widths, self.layout)

    def offsets(self) -> list[int]:
        """First packed dimension of each expert (by expert id)."""
        out = [0] * self.num_experts
        o = 0
        for e in self.expert_of_block():
            out[e] = o
            o += self.widths[e]
        return out

    @property
    def total(self) -> int:
        return sum(self.widths)


@dataclass(frozen=True)
class WidthGroup:
    """Experts of one layer served by one fused-MoE instance of width `width` (local id = position)."""

    width: int
    experts: tuple[int, ...]


def read_layouts(config: Mapping | object) -> dict[int, LayerLayout]:
    """Per-layer layouts from a config.json dict or a config object carrying moetrim's record."""
    record = config.get(VARWIDTH_KEY) if isinstance(config, Mapping) else getattr(config, VARWIDTH_KEY, None)
    if not isinstance(record, Mapping) or not isinstance(record.get("layers"), Mapping) or not record["layers"]:
        raise LayoutError(f"config has no '{VARWIDTH_KEY}' per-layer record; is this a moetrim variable-width checkpoint?")
    layout = record.get("layout", "by_expert")  # version-1 records predate the width-sorted layout
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown variable-width layout {layout!r}; this plugin reads {', '.join(LAYOUTS)}")
    out = {}
    for key, spec in record["layers"].items():
        widths = spec.get("widths") if isinstance(spec, Mapping) else None
        ok = (str(key).isdigit() and isinstance(widths, list) and widths
              and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
              and isinstance(spec.get("top_k"), int) and 1 <= spec["top_k"] <= len(widths)
              and spec.get("num_experts", len(widths)) == len(widths))
        if not ok:
            raise LayoutError(f"layer {key!r} of '{VARWIDTH_KEY}' needs positive integer widths, num_experts and 1 <= top_k <= num_experts")
        out[int(key)] = LayerLayout(tuple(widths), spec["top_k"], layout)
    return out


def served_widths(layouts: Mapping[int, LayerLayout]) -> tuple[dict[int, int], list[int]]:
    """Width each layer's one fused-MoE instance is built at, and the layers that must be padded to get it."""
    widths = {i: lay.uniform_width or max(lay.widths) for i, lay in layouts.items()}
    return widths, sorted(i for i, lay in layouts.items() if lay.uniform_width is None)


def width_groups(widths: Iterable[int], align: int = 1) -> list[WidthGroup]:
    """Group experts whose widths round up to the same multiple of `align`, widest group first.

    With align = the kernel's own padding granularity (32 for vLLM's CPU kernel), grouping costs
    nothing the kernel would not pay anyway."""
    if align < 1:
        raise ValueError("align must be >= 1")
    by_width: dict[int, list[int]] = {}
    for e, w in enumerate(widths):
        by_width.setdefault(-(-int(w) // align) * align, []).append(e)
    return [WidthGroup(w, tuple(es)) for w, es in sorted(by_width.items(), reverse=True)]


@dataclass(frozen=True)
class GroupPlan:
    """How one layer's experts are served as width groups: each expert's group and its id inside it."""

    groups: tuple[WidthGroup, ...]
    group_of: tuple[int, ...]  # by expert id (router order)
    local_of: tuple[int, ...]  # by expert id: position in its group's fused-MoE instance

    @property
    def num_experts(self) -> int:
        return len(self.group_of)

    def served_params(self, hidden: int) -> int:
        """Routed-expert parameters the groups hold (gate, up and down per expert at its group's width)."""
        return sum(3 * hidden * g.width * len(g.experts) for g in self.groups)


def group_plan(layer: LayerLayout, align: int = 1) -> GroupPlan:
    """Width groups of one layer (widest first; see `width_groups`) and every expert's (group, local id)."""
    groups = tuple(width_groups(layer.widths, align))
    group_of, local_of = [0] * layer.num_experts, [0] * layer.num_experts
    for g, grp in enumerate(groups):
        for j, e in enumerate(grp.experts):
            group_of[e], local_of[e] = g, j
    return GroupPlan(groups, tuple(group_of), tuple(local_of))


GroupRunner = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grouped_forward(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, group_of: torch.Tensor,
                    local_of: torch.Tensor, num_groups: int, run_group: GroupRunner) -> torch.Tensor:
    """Routed-expert output [T, H] of a layer served as width groups.

    x [T, H]; topk_weights / topk_ids [T, k] from the layer's own router (expert ids in router order);
    group_of / local_of [E] (long) from `group_plan`. run_group(g, rows [S, H], weights [S, 1], local ids
    [S, 1]) returns group g's top-1 output [S, H] with the weights applied (what a fused-MoE kernel of that
    group computes with top_k = 1). The slots of a group are taken in token order, and each row's result
    is added into its token's row, so a token whose k slots fall in several groups sums them all.
    Batches of at most `sync_free_tokens()` tokens take the fixed-shape path (no host read, so CUDA
    graphs capture it); larger ones count each group's slots on the host and run only those."""
    k = topk_ids.shape[-1]
    ids = topk_ids.reshape(-1).long()
    slot_group = group_of[ids]
    if x.shape[0] <= sync_free_tokens():
        return _grouped_forward_fixed(x, topk_weights, ids, slot_group, local_of, num_groups, run_group, k, topk_ids.dtype)
    order = torch.argsort(slot_group, stable=True)
    counts = torch.bincount(slot_group, minlength=num_groups).tolist()
    weights = topk_weights.reshape(-1, 1)
    out = torch.zeros_like(x)
    start = 0
    for g, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        rows = torch.div(slots, k, rounding_mode="floor")
        y = run_group(g, x.index_select(0, rows), weights.index_select(0, slots),
                      local_of[ids.index_select(0, slots)].to(topk_ids.dtype).view(-1, 1))
        out.index_add_(0, rows, y.to(out.dtype))
    return out


SYNC_FREE_ENV = "MOETRIM_VLLM_SYNC_FREE_TOKENS"
_SYNC_FREE_TOKENS = 512  # vLLM's largest CUDA-graph capture size by default: every captured batch takes the fixed path


def sync_free_tokens() -> int:
    """Batches of at most this many tokens take `grouped_forward`'s fixed-shape path ($MOETRIM_VLLM_SYNC_FREE_TOKENS)."""
    value = os.environ.get(SYNC_FREE_ENV)
    return int(value) if value and value.strip().lstrip("-").isdigit() else _SYNC_FREE_TOKENS


def _grouped_forward_fixed(x: torch.Tensor, topk_weights: torch.Tensor, ids: torch.Tensor, slot_group: torch.Tensor,
                           local_of: torch.Tensor, num_groups: int, run_group: GroupRunner, k: int,
                           id_dtype: torch.dtype) -> torch.Tensor:
    """The grouped computation with shapes fixed by the batch alone, so nothing is read back to the host and
    a CUDA graph can capture it: every group gets all T*k slot rows, the slots routed elsewhere with weight 0
    at local expert 0 (their rows add exactly 0). The extra rows all land on one expert per group, so a
    decode step reads no more weights than the counted path; the extra arithmetic is why large batches
    (prefill) keep the counted path."""
    rows = torch.div(torch.arange(ids.numel(), device=x.device), k, rounding_mode="floor")
    xs = x.index_select(0, rows)
    weights = topk_weights.reshape(-1, 1)
    local = local_of[ids]
    out = torch.zeros_like(x)
    for g in range(num_groups):
        member = slot_group == g
        w = torch.where(member[:, None], weights, torch.zeros_like(weights))
        y = run_group(g, xs, w, torch.where(member, local, torch.zeros_like(local)).to(id_dtype).view(-1, 1))
        out.index_add_(0, rows, y.to(out.dtype))
    return out


def unpack_gate_up(gate_up: torch.Tensor, layer: LayerLayout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(gate [I_e, H], up [I_e, H]) per expert id: views into `gate_up`."""
    if gate_up.ndim != 2 or gate_up.shape[0] != 2 * layer.total:
        raise LayoutError(f"gate_up has shape {tuple(gate_up.shape)}; the record's widths need [{2 * layer.total}, H]")
    out = []
    for e, o in enumerate(layer.offsets()):
        w = layer.widths[e]
        block = gate_up[2 * o: 2 * (o + w)]
        out.append((block[:w], block[w:]))
    return out


def unpack_down(down_blocks: torch.Tensor, layer: LayerLayout, hidden: int) -> list[torch.Tensor]:
    """down [H, I_e] per expert id: views into the flat `down_blocks`."""
    if down_blocks.ndim != 1 or down_blocks.numel() != hidden * layer.total:
        raise LayoutError(f"down_blocks has {down_blocks.numel()} elements; the record's widths need {hidden * layer.total}")
    return [down_blocks.narrow(0, hidden * o, hidden * w).view(hidden, w) for o, w in zip(layer.offsets(), layer.widths)]


def pad_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """[I, H] -> [width, H] with zero rows (I <= width)."""
    return t if t.shape[0] == width else torch.cat([t, t.new_zeros(width - t.shape[0], t.shape[1])])


def pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    """[H, I] -> [H, width] with zero columns (I <= width)."""
    return t if t.shape[1] == width else torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], dim=1)


def stack_group(gate_up: torch.Tensor, down_blocks: torch.Tensor, layer: LayerLayout, group: WidthGroup,
                hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's fused tensors: w13 [G, 2W, H] (gate rows then up rows) and w2 [G, H, W]."""
    gu, down = unpack_gate_up(gate_up, layer), unpack_down(down_blocks, layer, hidden)
    w13 = torch.stack([torch.cat([pad_rows(gu[e][0], group.width), pad_rows(gu[e][1], group.width)]) for e in group.experts])
    w2 = torch.stack([pad_cols(down[e], group.width) for e in group.experts])
    return w13, w2


@dataclass(frozen=True)
class ExpertNames:
    """How a serving engine names one expert's tensors: f"{prefix}{block}.experts.{e}.{gate}.weight"."""

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


def per_expert_tensors(
    weights: Iterable[tuple[str, torch.Tensor]],
    layouts: Mapping[int, LayerLayout],
    names: ExpertNames,
    hidden: int,
    pad_to: Mapping[int, int] | None = None,
    rename: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a variable-width checkpoint's tensors as the engine's per-expert tensors.

    Packed `gate_up` / `down_blocks` of a recorded layer become one tensor per expert and projection
    (widths as stored, or zero-padded to `pad_to[layer]`); every other tensor passes through, its name
    rewritten by the substring map `rename` (e.g. Mixtral's '.mlp.' -> '.block_sparse_moe.')."""
    pad_to = pad_to or {}
    for name, t in weights:
        m = _PACKED.match(name)
        if m is None:
            for old, new in (rename or {}).items():
                name = name.replace(old, new)
            yield name, t
            continue
        index = int(m["index"])
        if index not in layouts:
            raise LayoutError(f"{name}: layer {index} is not in the checkpoint's variable-width record")
        layer, base = layouts[index], f"{m['layer']}{names.block}.experts."
        width = pad_to.get(index)
        if m["what"] == "gate_up":
            for e, (gate, up) in enumerate(unpack_gate_up(t, layer)):
                yield f"{base}{e}.{names.gate}.weight", pad_rows(gate, width) if width else gate.contiguous()
                yield f"{base}{e}.{names.up}.weight", pad_rows(up, width) if width else up.contiguous()
        else:
            for e, down in enumerate(unpack_down(t, layer, hidden)):
                yield f"{base}{e}.{names.down}.weight", pad_cols(down, width) if width else down.contiguous()
