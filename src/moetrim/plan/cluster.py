"""Grouping experts for the replace and merge plans: average-linkage agglomerative clustering of
feature rows, on cosine similarity (replace: each expert's mean routed output) or Euclidean distance
(HC-SMoE's merge: every expert's mean output over the same tokens, wazenmai/HC-SMoE
`hcsmoe/merging/clustering.py`), never above `max_group` members."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from moetrim.errors import UsageError


def mean_outputs(profile, layer: int) -> torch.Tensor:
    """Each expert's mean output over its routed tokens, out_sum / count [E, H] (zero for an unused expert)."""
    count = profile.get(layer, "count").double()
    return profile.get(layer, "out_sum").double() / count.clamp(min=1)[:, None]


def dense_mean_outputs(profile, layer: int) -> torch.Tensor:
    """Each expert's mean output over every calibration token, dense_out_sum / tokens [E, H]: all experts
    on the same tokens, so two experts' similarity depends on their weights, not on where the router
    sent tokens (HC-SMoE's clustering features)."""
    tokens = float(profile.get(layer, "tokens").reshape(()))
    return profile.get(layer, "dense_out_sum").double() / max(tokens, 1.0)


def cluster_experts(
    features: torch.Tensor, experts: Sequence[int], *, max_group: int, num_groups: int | None = None, metric: str = "cosine"
) -> list[list[int]]:
    """Group `experts` (ids into the rows of features [E, H], e.g. `mean_outputs`) by average-linkage
    agglomerative clustering, never above `max_group` members. metric "cosine": the average cosine
    similarity between members; "euclidean": the average Euclidean distance (HC-SMoE's).

    Merges the most similar pair of clusters whose union fits until `num_groups` remain (default: as
    few as `max_group` allows, ⌈n / max_group⌉) or no pair fits; so the result may hold more groups than
    asked. Deterministic: ties go to the lowest pair of cluster positions. Groups come back sorted,
    each by id and all by first member. Under cosine a zero feature row (an unused expert) is similar
    to nothing (0)."""
    ids = [int(e) for e in experts]
    n = len(ids)
    if not isinstance(max_group, int) or max_group < 1:
        raise UsageError(f"max_group must be a whole number >= 1, got {max_group!r}")
    if len(set(ids)) != n or any(not 0 <= e < features.shape[0] for e in ids):
        raise UsageError(f"experts to cluster must be distinct ids below {features.shape[0]}, got {ids}")
    if n == 0:
        return []
    target = math.ceil(n / max_group) if num_groups is None else num_groups
    if not isinstance(target, int) or not 1 <= target <= n:
        raise UsageError(f"num_groups must be between 1 and the {n} experts to cluster, got {num_groups!r}")
    if metric not in ("cosine", "euclidean"):
        raise UsageError(f"unknown clustering metric {metric!r}; choose cosine or euclidean")
    f = features[ids].double().cpu()
    if metric == "cosine":
        f = f / f.norm(dim=1, keepdim=True).clamp(min=1e-30)
        link = f @ f.T  # link[a, b]: Σ similarity over member pairs of clusters a and b
    else:
        link = -torch.cdist(f, f)  # a similarity: minus the distance, summed over member pairs the same way
    members: list[list[int] | None] = [[i] for i in range(n)]
    size = torch.ones(n, dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    for _ in range(n - target):
        average = link / (size[:, None] * size[None, :])
        ok = upper & alive[:, None] & alive[None, :] & (size[:, None] + size[None, :] <= max_group)
        if not ok.any():
            break
        best = int(torch.where(ok, average, torch.tensor(-math.inf, dtype=torch.float64)).flatten().argmax())
        a, b = divmod(best, n)
        link[a] += link[b]
        link[:, a] += link[:, b]
        size[a] += size[b]
        alive[b] = False
        members[a] = members[a] + members[b]
        members[b] = None
    return sorted((sorted(ids[i] for i in m) for m in members if m is not None), key=lambda g: g[0])
