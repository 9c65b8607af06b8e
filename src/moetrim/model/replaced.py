"""Replaced experts: some experts kept, the others a shared group base plus a low-rank correction each.

Drop-in for a family's fused experts module: same call `experts(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]`, the router untouched (it still routes among all E experts). Per layer:

    kept experts     kept_gate_up [K, 2I, H], kept_down [K, H, I]    (gate rows first, then up rows)
    group bases      base_gate_up [G, 2I, H], base_down [G, H, I]    (one full expert per group)
    corrections      gate_a/up_a [R, r, H], gate_b/up_b [R, I, r],   for the R replaced experts, in
                     down_a [R, r, I], down_b [R, H, r]              increasing id (absent when r = 0)
    novices          novice_out [N, H]                               one constant output per novice (MoNE),
                                                                     in increasing id (absent when N = 0)

Replaced expert e of group g computes the expert with W_g + B_e A_e for each of its three matrices:
gate_pre = W_gate x + B (A x) (never materialising W + BA), so the activation sees the corrected
pre-activations. Each group's base products run once per call for every token routed to any of its
members: W_gate_up x once per token, and W_down once on Σ_e w_e h_e (linear, so summing the members'
intermediate activations first is exact). With r = 0 every member *is* the base (a merge): a token
that picks two members runs the base once with their summed routing weight (HC-SMoE's semantics).
A novice (MoNE, zxgx/mode-pd) computes nothing: a token routed to it adds g · v_e, its constant output.

Everything is plain torch ops, so autograd trains kept experts, bases and factors alike. Gated
experts without biases only (every family but GPT-OSS).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moetrim.errors import MoetrimError, UsageError
from moetrim.model.grouped import grouped_mm_supports
from moetrim.model.view import ExpertWeights

REPLACED_KEY = "moetrim_replaced"
REPLACED_MODEL_TYPE = "moetrim_replaced"
RECORD_VERSION = 1
_SPEC_FIELDS = ("num_experts", "width", "kept", "groups", "rank")
_OPTIONAL_FIELDS = ("novices",)  # recorded only where a layer has some (records of older moetrim lack it)
_FACTORS = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")

Activation = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def check_layout(num_experts: int, width: int, hidden: int, kept: Sequence[int], groups: Sequence[Sequence[int]], rank: int,
                 novices: Sequence[int] = ()) -> None:
    """UsageError (one line) unless every expert is kept, a novice or in exactly one non-empty group,
    some expert has weights, and 0 <= rank <= min(width, hidden): the rank of a difference of two [I, H]
    matrices is at most that."""
    kept, groups, novices = list(kept), [list(g) for g in groups], list(novices)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise UsageError(f"rank must be a whole number >= 0, got {rank!r}")
    if rank > min(width, hidden):
        raise UsageError(f"rank {rank} is more than the experts' width {width} (hidden {hidden}); use at most {min(width, hidden)}")
    if not _ints(kept) or not all(_ints(g) for g in groups) or not _ints(novices):
        raise UsageError("kept experts, groups and novices must be lists of expert ids (integers)")
    members = [e for g in groups for e in g]
    bad = sorted({e for e in kept + members + novices if not 0 <= e < num_experts})
    if bad:
        raise UsageError(f"expert ids {bad} are out of range: the layer has {num_experts} experts (0..{num_experts - 1})")
    if len(set(kept)) != len(kept):
        raise UsageError(f"kept experts are listed twice: {sorted({e for e in kept if kept.count(e) > 1})}")
    if any(not g for g in groups):
        raise UsageError("every group needs at least one member")
    both = sorted(set(kept) & set(members))
    if both:
        raise UsageError(f"experts {both} are both kept and replaced (in a group)")
    if len(set(members)) != len(members):
        raise UsageError(f"experts {sorted({e for e in members if members.count(e) > 1})} are in more than one group")
    if len(set(novices)) != len(novices):
        raise UsageError(f"novices are listed twice: {sorted({e for e in novices if novices.count(e) > 1})}")
    twice = sorted(set(novices) & (set(kept) | set(members)))
    if twice:
        raise UsageError(f"experts {twice} are novices and also kept or in a group")
    missing = sorted(set(range(num_experts)) - set(kept) - set(members) - set(novices))
    if missing:
        raise UsageError(f"experts {missing} are neither kept, novices nor in a group: the groups must cover every replaced expert")
    if not kept and not groups:
        raise UsageError("a layer needs at least one expert with weights (kept or a group base), not novices alone")


def replaced_param_count(hidden: int, width: int, kept: int, groups: int, replaced: int, rank: int, novices: int = 0) -> int:
    """Parameters a replaced layer stores: full experts (kept and bases), 3 rank-r factor pairs per
    replaced expert and one hidden-size vector per novice. Equals the numel of the tensors
    `ReplacedExperts` saves (tested)."""
    return (kept + groups) * 3 * hidden * width + replaced * rank * 3 * (hidden + width) + novices * hidden


class ReplacedExperts(nn.Module):
    """Routed experts where replaced experts share a group base and keep a rank-r correction each."""

    is_moetrim_replaced = True
    has_gate = gated = True
    has_bias = False

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        width: int,
        kept: Sequence[int],
        groups: Sequence[Sequence[int]],
        rank: int,
        activation: Activation,
        *,
        novices: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_layout(num_experts, width, hidden_size, kept, groups, rank, novices)
        self.num_experts, self.hidden_dim, self.width, self.rank = int(num_experts), int(hidden_size), int(width), int(rank)
        self.kept = [int(e) for e in kept]
        self.groups = [[int(e) for e in g] for g in groups]
        self.replaced = sorted(e for g in self.groups for e in g)  # factor row m belongs to expert replaced[m]
        self.novices = sorted(int(e) for e in novices)  # novice_out row n belongs to expert novices[n]
        self.widths = [self.width] * self.num_experts
        self.activation = activation
        K, G, R, I, H, r = len(self.kept), len(self.groups), len(self.replaced), self.width, self.hidden_dim, self.rank
        # unit u < K: kept expert kept[u]; unit K + g: group g; a novice has no unit (K + G, what the grouped path
        # treats as padding). member: factor row, -1 for kept experts and novices; novice: novice_out row, else -1
        self.unit_of_expert = [K + G] * self.num_experts
        self.member_of_expert = [-1] * self.num_experts
        self.novice_of_expert = [-1] * self.num_experts
        for n, e in enumerate(self.novices):
            self.novice_of_expert[e] = n
        for u, e in enumerate(self.kept):
            self.unit_of_expert[e] = u
        for g, members in enumerate(self.groups):
            for e in members:
                self.unit_of_expert[e] = K + g
        for m, e in enumerate(self.replaced):
            self.member_of_expert[e] = m
        kw = {"dtype": dtype, "device": device}

        def param(*shape: int) -> nn.Parameter | None:  # an empty stack is not stored (safetensors and numel stay exact)
            return nn.Parameter(torch.empty(*shape, **kw)) if all(shape) else None

        self.kept_gate_up, self.kept_down = param(K, 2 * I, H), param(K, H, I)
        self.base_gate_up, self.base_down = param(G, 2 * I, H), param(G, H, I)
        shapes = {"gate_a": (R, r, H), "gate_b": (R, I, r), "up_a": (R, r, H), "up_b": (R, I, r), "down_a": (R, r, I), "down_b": (R, H, r)}
        for name in _FACTORS:
            self.register_parameter(name, param(*shapes[name]))
        self.novice_out = param(len(self.novices), H)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_dim}, width={self.width}, kept={len(self.kept)}, "
                f"groups={len(self.groups)}, replaced={len(self.replaced)}, rank={self.rank}, novices={len(self.novices)}")

    def spec(self) -> dict:
        """The layer's record in config.json (`moetrim_replaced`): enough to rebuild the module's shapes."""
        spec = {"num_experts": self.num_experts, "width": self.width, "kept": list(self.kept),
                "groups": [list(g) for g in self.groups], "rank": self.rank}
        if self.novices:
            spec["novices"] = list(self.novices)
        return spec

    def param_count(self) -> int:
        return replaced_param_count(self.hidden_dim, self.width, len(self.kept), len(self.groups), len(self.replaced), self.rank,
                                    len(self.novices))

    # -- canonical access -------------------------------------------------------------------
    def _unit_weights(self, u: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of unit u: a kept expert or a group base."""
        K = len(self.kept)
        return (self.kept_gate_up[u], self.kept_down[u]) if u < K else (self.base_gate_up[u - K], self.base_down[u - K])

    def expert_weights(self, e: int) -> ExpertWeights:
        """Expert e's canonical tensors: views for a kept expert; for a replaced one its effective weights
        W_base + B A, computed (writing into them changes nothing). A novice has none (MoetrimError)."""
        if self.novice_of_expert[e] >= 0:
            raise MoetrimError(f"expert {e} is a novice (a constant output, MoNE): it has no weights")
        gate_up, down = self._unit_weights(self.unit_of_expert[e])
        I, m = self.width, self.member_of_expert[e]
        gate, up = gate_up[:I], gate_up[I:]
        if m >= 0 and self.rank:
            gate = gate + self.gate_b[m] @ self.gate_a[m]
            up = up + self.up_b[m] @ self.up_a[m]
            down = down + self.down_b[m] @ self.down_a[m]
        return ExpertWeights(gate, up, down)

    # -- compute ----------------------------------------------------------------------------
    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unit, factor row, novice row, unit with kept experts as padding) of every expert id as tensors on
        `device` (factor row R for kept experts), built once per device (not buffers: a checkpoint holds weights
        only, the record rebuilds the rest)."""
        cache = self.__dict__.setdefault("_table_cache", {})
        if device not in cache:
            K, G, R, N = len(self.kept), len(self.groups), len(self.replaced), len(self.novices)
            cache[device] = (torch.tensor(self.unit_of_expert, dtype=torch.long, device=device),
                             torch.tensor([m if m >= 0 else R for m in self.member_of_expert], dtype=torch.long, device=device),
                             torch.tensor([n if n >= 0 else N for n in self.novice_of_expert], dtype=torch.long, device=device),
                             torch.tensor([K + G if u < K else u for u in self.unit_of_expert], dtype=torch.long, device=device))
        return cache[device]

    def _add_novices(self, out: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """out += g · v_e for every slot routed to a novice (other slots gather a zero row: fixed shapes, no sync)."""
        novice_of = self._tables(out.device)[2]
        table = torch.cat([self.novice_out.to(out.dtype), out.new_zeros(1, out.shape[1])])
        return out.index_add_(0, token, table.index_select(0, novice_of[flat]) * weight[:, None])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
                kept: bool = True) -> torch.Tensor:
        """Fixed shapes and no host sync: every step is a sort, a gather or a grouped GEMM over all T*k slots,
        with the rows past each call's last offset computed by no kernel and masked out (as the stock
        grouped experts do). A unit (kept expert or group base) runs once per (token, unit) pair.

        kept=False leaves the kept experts' slots out (they add nothing): for a caller that runs the kept
        experts elsewhere, as the vLLM plugin does in the family's stock fused MoE. The kept stacks are then
        never read, so such a caller may drop them."""
        x = hidden_states
        T, k = top_k_index.shape
        S, dev = T * k, x.device
        if dev.type == "cpu" and S <= _HOST_SLOTS and (S <= _HOST_SLOTS_ANY or self.width * x.shape[1] <= _HOST_ELEMENTS):
            return self._forward_host(x, top_k_index, top_k_weights, kept=kept)
        K, G, R, I, r = len(self.kept), len(self.groups), len(self.replaced), self.width, self.rank
        unit_of, member_of, _, unit_of_unkept = self._tables(dev)
        flat = top_k_index.reshape(-1)
        unit, member = (unit_of if kept else unit_of_unkept)[flat], member_of[flat]
        if not kept and not G:  # nothing but novices to compute
            out = x.new_zeros(T, x.shape[1])
            return self._add_novices(out, flat, top_k_weights.reshape(-1).to(x.dtype), torch.arange(S, device=dev) // k) \
                if self.novices else out
        kept_gate_up, kept_down, ends_from = (self.kept_gate_up, self.kept_down, 0) if kept else (None, None, K)
        rows = torch.arange(S, device=dev)
        token = rows // k
        weight = top_k_weights.reshape(-1).to(x.dtype)
        # (unit, token) pairs in unit-then-token order; pair ids 0..P-1, the rows past P are padding (unit K+G)
        key_sorted, order = torch.sort(unit * T + token)
        first = torch.ones(S, dtype=torch.bool, device=dev)
        first[1:] = key_sorted[1:] != key_sorted[:-1]
        pair_rank = first.cumsum(0) - 1
        pair_of_slot = torch.empty_like(pair_rank).scatter_(0, order, pair_rank)
        pair_unit = torch.full((S,), K + G, dtype=torch.long, device=dev).scatter_(0, pair_rank, unit[order])
        pair_token = torch.zeros(S, dtype=torch.long, device=dev).scatter_(0, pair_rank, token[order])
        ends = _ends(pair_unit, K + G)
        gu = self._units(x.index_select(0, pair_token), ends[ends_from:], kept_gate_up, self.base_gate_up)
        gu = gu.index_select(0, pair_of_slot)
        if self.novices or not kept:  # a novice's (or left-out kept) slot sits in a padding row no kernel wrote: zero it,
            gu = gu.masked_fill((unit == K + G)[:, None], 0)  # or its garbage (0 · NaN) reaches the output and gradients
        gate, up = gu[:, :I], gu[:, I:]
        if r and R:  # the replaced slots' corrections, grouped by factor row (kept slots sort last, masked)
            m_sorted, m_order = torch.sort(member)
            m_ends = _ends(m_sorted, R)
            padding = (rows >= m_ends[-1])[:, None]  # in member order: the kept slots
            back = torch.empty_like(m_order).scatter_(0, m_order, rows)  # slot -> its row in member order
            xs = x.index_select(0, token[m_order])

            def corr(a: torch.Tensor, b: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
                return _gmm(_gmm(inp, a.transpose(1, 2), m_ends), b.transpose(1, 2), m_ends).masked_fill_(padding, 0)

            gate = gate + corr(self.gate_a, self.gate_b, xs).index_select(0, back)
            up = up + corr(self.up_a, self.up_b, xs).index_select(0, back)
        h = self.activation(gate, up) * weight[:, None]
        # each unit's down product once per pair, on the pair's summed Σ_e w_e h_e (linear, so exact)
        acc = h.new_zeros(S, I).index_add_(0, pair_of_slot, h)
        down = self._units(acc, ends[ends_from:], kept_down, self.base_down)
        out = x.new_zeros(T, x.shape[1]).index_add_(0, pair_token, down.masked_fill_((rows >= ends[-1])[:, None], 0))
        if r and R:
            out.index_add_(0, token[m_order], corr(self.down_a, self.down_b, h.index_select(0, m_order)))
        if self.novices:
            self._add_novices(out, flat, weight, token)
        return out

    def _forward_host(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
                      kept: bool = True) -> torch.Tensor:
        """A few slots on the CPU (decode): there a host read costs nothing and the sort and offset kernels
        of the grouped path cost more than the products, so walk the units that received slots. As in the
        grouped path a unit's products run once per token (a group's down product on Σ_e w_e h_e). The
        corrections of a group's slots (`_slot_corrections`) gather the slots' factor rows into one bmm for
        small experts and read them in place, two linears a slot, for large ones."""
        T, k = top_k_index.shape
        K, I, dev = len(self.kept), self.width, x.device
        small = self.width * x.shape[1] <= _HOST_ELEMENTS
        experts = top_k_index.reshape(-1).tolist()
        weight = top_k_weights.reshape(-1).to(x.dtype)
        slots_of: dict[int, list[int]] = {}
        for s, e in enumerate(experts):
            if self.novice_of_expert[e] < 0 and (kept or self.unit_of_expert[e] >= K):
                slots_of.setdefault(self.unit_of_expert[e], []).append(s)
        out = x.new_zeros(T, x.shape[1])
        if self.novices:
            rows = torch.arange(T * k, device=dev)
            self._add_novices(out, top_k_index.reshape(-1), weight, rows // k)
        for u in sorted(slots_of):
            slots = slots_of[u]
            first: dict[int, int] = {}
            pos = [first.setdefault(s // k, len(first)) for s in slots]
            tok = torch.tensor(list(first), dtype=torch.long, device=dev)
            p = torch.tensor(pos, dtype=torch.long, device=dev)
            w = weight.index_select(0, torch.tensor(slots, dtype=torch.long, device=dev))
            xs = x.index_select(0, tok)
            gate_up, down = self._unit_weights(u)
            gu = F.linear(xs, gate_up)
            if u < K or not self.rank:  # one activation per token, on its summed routing weight
                w_tok = w.new_zeros(len(first)).index_add_(0, p, w)
                h = self.activation(gu[:, :I], gu[:, I:]) * w_tok[:, None]
                out.index_add_(0, tok, F.linear(h, down))
                continue
            members = [self.member_of_expert[experts[s]] for s in slots]
            m = torch.tensor(members, dtype=torch.long, device=dev) if small else None  # small: gather the factors
            gu, xm = gu.index_select(0, p), xs.index_select(0, p)
            gate = gu[:, :I] + _slot_corrections(xm, self.gate_a, self.gate_b, members, m)
            up = gu[:, I:] + _slot_corrections(xm, self.up_a, self.up_b, members, m)
            h = self.activation(gate, up) * w[:, None]
            acc = h.new_zeros(len(first), I).index_add_(0, p, h)
            out.index_add_(0, tok, F.linear(acc, down))
            out.index_add_(0, tok.index_select(0, p), _slot_corrections(h, self.down_a, self.down_b, members, m))
        return out

    def _units(self, x: torch.Tensor, ends: torch.Tensor, kept: torch.Tensor | None, bases: torch.Tensor | None) -> torch.Tensor:
        """Rows of `x` (pairs sorted by unit: kept experts first, then group bases) times their unit's matrix
        ([U, out, in] stacks); rows past the last pair are undefined. The base rows are rotated to the front
        for their grouped call by a gather, not a slice, so no count leaves the device."""
        K = len(self.kept)
        if bases is None:
            return _gmm(x, kept.transpose(1, 2), ends)
        if kept is None:
            return _gmm(x, bases.transpose(1, 2), ends)
        S = x.shape[0]
        rows = torch.arange(S, device=x.device)
        n_kept = ends[K - 1].long()
        y_kept = _gmm(x, kept.transpose(1, 2), ends[:K])
        y_base = _gmm(x.index_select(0, (rows + n_kept) % S), bases.transpose(1, 2), ends[K:] - ends[K - 1])
        return torch.where((rows < n_kept)[:, None], y_kept, y_base.index_select(0, (rows - n_kept) % S))


# On the CPU the host walk (`_forward_host`) takes at most _HOST_SLOTS (token, expert) slots of small experts
# (width x hidden <= _HOST_ELEMENTS) and at most _HOST_SLOTS_ANY slots of any size; the rest take the grouped path.
# Measured: at the reference models' shapes (hidden 128, width 64-128) the walk decodes at 0.90-1.17x dense where
# the grouped path's fixed kernels gave about 0.6x (speed.py --quick, replace.py --quick). At real shapes (one layer,
# bf16, 1 thread; OLMoE and Qwen3-30B-A3B, 50% removed) one decode token (8 slots) walks at 1.35x / 1.26x stock for
# replace and 1.60x / 1.47x for D²-MoE, against 1.06x / 0.84x and 1.30x / 1.38x grouped, since the walk reads each
# slot's factor rows in place; from 16 slots the grouped path is ahead (OLMoE 2 tokens: replace 1.12x vs 1.05x,
# D²-MoE 1.57x vs 1.16x).
_HOST_SLOTS = 32
_HOST_SLOTS_ANY = 8
_HOST_ELEMENTS = 1 << 16


def _slot_corrections(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, members: list[int],
                      gathered: torch.Tensor | None) -> torch.Tensor:
    """Row i's correction B_m A_m x_i for its factor row m = members[i]: x [n, in], a [R, r, in], b [R, out, r].
    With `gathered` (members as a tensor; small experts) the rows' factors are gathered into one bmm each (fewest
    calls). Else two linears a row on views of its own factors, read in place: a gather would copy them first,
    and D²-MoE's deltas are about half an expert each."""
    if gathered is not None:
        return _low_rank(x, a, b, gathered)
    return torch.stack([F.linear(F.linear(x[i], a[m]), b[m]) for i, m in enumerate(members)])


def _low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Each row's correction B_m A_m x for its own factor row m, gathered: x [n, in], a [R, r, in], b [R, out, r]."""
    z = torch.bmm(x[:, None, :], a.index_select(0, member).transpose(1, 2))
    return torch.bmm(z, b.index_select(0, member).transpose(1, 2)).squeeze(1)


def _ends(group_of_row: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-GEMM offsets (int32 cumulative ends) of rows sorted by group; ids >= `groups` are padding."""
    counts = torch.zeros(groups + 1, dtype=torch.int32, device=group_of_row.device)
    counts.scatter_add_(0, group_of_row.clamp(max=groups), torch.ones_like(group_of_row, dtype=torch.int32))
    return counts[:groups].cumsum(0, dtype=torch.int32)


# Where grouped GEMMs do not apply: at most this many rows, and weights this small once gathered per row, take
# one bmm (no sync); more take one matmul per group.
_GATHER_ROWS, _GATHER_ELEMENTS = 64, 1 << 20


def _grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes x [S, in] @ w [G, in, out]: a kernel for the device and dtype,
    16-byte strides and pointers."""
    size = x.element_size()
    return x.dtype == w.dtype and grouped_mm_supports(x) and all(n * size % 16 == 0 for n in (w.shape[1], w.shape[2])) \
        and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0 and x.stride(1) == 1 and x.stride(0) * size % 16 == 0


def _gmm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x [S, in] rows sorted by group, w [G, in, out], ends [G] cumulative row ends -> [S, out]; rows past
    ends[-1] are undefined. torch's grouped GEMM where it applies, else a gathered bmm for a few rows
    (still no sync) or one matmul per group."""
    if _grouped_ok(x, w):
        if torch.is_grad_enabled() and x.requires_grad:  # its backward leaves the padding rows' input gradient
            x = torch.where((torch.arange(x.shape[0], device=x.device) < ends[-1])[:, None], x, 0)  # undefined: cut them
        return F.grouped_mm(x, w, offs=ends)
    S, G = x.shape[0], w.shape[0]
    if S <= _GATHER_ROWS and S * w.shape[1] * w.shape[2] <= _GATHER_ELEMENTS:
        group = torch.searchsorted(ends, torch.arange(S, device=x.device, dtype=ends.dtype), right=True).clamp(max=G - 1)
        return torch.bmm(x[:, None, :], w.index_select(0, group)).squeeze(1)
    out = x.new_zeros(S, w.shape[2])
    start = 0
    for g, end in enumerate(ends.tolist()):  # a fallback (misaligned shapes, CUDA fp32): it syncs once
        if end > start:
            out[start:end] = x[start:end] @ w[g]
        start = end
    return out


def _check_spec(key: str, spec, layer) -> None:
    """One layer's record as a person may have edited it (MoetrimError naming the field)."""
    if not isinstance(spec, dict) or not set(_SPEC_FIELDS) <= set(spec) <= set(_SPEC_FIELDS + _OPTIONAL_FIELDS):
        raise MoetrimError(f"layer {key} needs exactly the fields {', '.join(_SPEC_FIELDS)} (and novices where it has some)")
    if spec["num_experts"] != layer.num_experts or spec["width"] != layer.widths[0]:
        raise MoetrimError(f"layer {key}: {spec['num_experts']} experts of width {spec['width']} recorded, but the config "
                           f"builds {layer.num_experts} of width {layer.widths[0]}")
    if not isinstance(spec["groups"], list):
        raise MoetrimError(f"layer {key}: groups must be a list of lists of expert ids")
    try:
        check_layout(layer.num_experts, layer.widths[0], layer.hidden_size, spec["kept"], spec["groups"], spec["rank"],
                     spec.get("novices", []))
    except (UsageError, TypeError) as exc:
        raise MoetrimError(f"layer {key}: {exc}") from None


def restore_replaced(model: nn.Module, record) -> None:
    """Swap in meta-device `ReplacedExperts` for every layer the record names (weights loaded after)."""
    from moetrim.model.view import find_moe_layers

    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION or not isinstance(record.get("layers"), dict) \
            or not record["layers"]:
        raise MoetrimError(f"needs version {RECORD_VERSION} and a non-empty per-layer record; restore the config.json moetrim wrote")
    layers = {l.index: l for l in find_moe_layers(model)}
    for key, spec in record["layers"].items():
        if not key.isdigit() or int(key) not in layers:
            raise MoetrimError(f"names layer {key!r}, which is not an MoE layer of this model ({sorted(layers)})")
        layer = layers[int(key)]
        _check_spec(key, spec, layer)
        check_replaceable(layer)
        with torch.device("meta"):
            new = ReplacedExperts(layer.num_experts, layer.hidden_size, spec["width"], spec["kept"], spec["groups"],
                                  spec["rank"], layer.activation(), novices=spec.get("novices", []))
        install_layer(model, layer, new)


def check_replaceable(layer) -> None:
    """MoetrimError for experts this module cannot compute: biases (GPT-OSS), ungated, post-expert norms."""
    if layer.has_bias:
        raise MoetrimError(f"layer {layer.index}: experts with biases (GPT-OSS) cannot be replaced yet; "
                           "replacing supports gated experts without biases (Qwen-MoE, OLMoE, Mixtral, DeepSeek)")
    if not layer.gated or getattr(layer.experts, "has_post_expert_norm", False):
        raise MoetrimError(f"layer {layer.index}: only gated experts without a post-expert norm can be replaced")


def install_layer(model: nn.Module, layer, experts: ReplacedExperts) -> None:
    """Put `experts` in the layer's block and record its layout in the model's config (saved with it)."""
    name = next(c for c, m in layer.block.named_children() if m is layer.experts)
    setattr(layer.block, name, experts)
    layer.experts = experts
    record = getattr(model.config, REPLACED_KEY, None) or {"version": RECORD_VERSION, "layers": {}}
    record["layers"][str(layer.index)] = experts.spec()
    record["layers"] = dict(sorted(record["layers"].items(), key=lambda kv: int(kv[0])))
    setattr(model.config, REPLACED_KEY, record)
