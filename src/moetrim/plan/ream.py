"""REAM's grouping (SamsungSAILMontreal/ream `ream.py`, `merger.py`): which experts survive as centroids and
which experts are merged into each, from the one calibration profile.

Per MoE layer of N experts keeping k:
- saliency S_e = Σ g²‖y‖ / count over the expert's routed tokens (the profile's moments[2, 1]): REAP with the
  routing weight applied twice, REAM's default (`gated_sim`); experts scoring 0 get min(0.5, the smallest
  nonzero score), as theirs;
- the k most salient experts are centroids; visiting them from the most salient, each takes its
  `group_size` − 1 nearest unassigned non-centroid experts (REAM's "pseudo-grouping": centroids never merge
  with each other, and the most salient centroids absorb the rest);
- distance d(i, j) = 1 − ½ [(cos(m_i, m_j) + 1) / 2 + 1 − ‖r̂_i − r̂_j‖ / max ‖r̂_a − r̂_b‖], m the expert's
  gated mean output and r̂ its column of router logits over every token, normalised.

Where ours differs from their code: m is Σ g·y over the tokens routed to the expert (the profile's
gated_out_sum) where theirs averages p·y over every token with p the full softmax; ‖r̂_i − r̂_j‖ comes from
the logits' Gram (the profile's logit_gram), which is exact; g is the weight the model applies (after top-k
renormalisation) where theirs takes the raw softmax probability. Statistics come from one calibration
pass, not re-collected layer by layer after earlier layers are merged (their `--sequential` default).
"""

from __future__ import annotations

import math

import torch

from moetrim.errors import UsageError

GROUP_SIZE = 16  # REAM's default group size C


def saliency(profile, layer: int) -> torch.Tensor:
    """S_e = mean over routed tokens of g²‖y‖ [E]; zeros lifted to min(0.5, smallest nonzero) as REAM does."""
    moments = profile.get(layer, "moments").double()
    count = moments[:, 0, 0]
    s = torch.where(count > 0, moments[:, 2, 1] / count.clamp(min=1), torch.zeros_like(count))
    nonzero = s[s > 0]
    floor = min(0.5, float(nonzero.min())) if nonzero.numel() else 0.5
    return torch.where(s > 0, s, torch.full_like(s, floor))


def distances(profile, layer: int) -> torch.Tensor:
    """REAM's expert distance [E, E]: half output dissimilarity, half router-logit dissimilarity."""
    try:
        m = profile.get(layer, "gated_out_sum").double()
        gram = profile.get(layer, "logit_gram").double()
    except UsageError as exc:
        raise UsageError(f"REAM {exc}") from None
    m = m / m.norm(dim=1, keepdim=True).clamp(min=1e-30)
    output_sim = ((m @ m.T) + 1) / 2
    norms = gram.diagonal().clamp(min=1e-30).sqrt()
    cos = (gram / norms[:, None] / norms[None, :]).clamp(-1, 1)
    router = (2 - 2 * cos).clamp(min=0).sqrt()  # ‖r̂_i − r̂_j‖ of unit columns
    top = float(router.max())
    router_sim = 1 - router / top if top > 0 else torch.ones_like(router)
    return 1 - (output_sim + router_sim) / 2


def groups(sal: torch.Tensor, dist: torch.Tensor, keep: int, group_size: int = GROUP_SIZE) -> list[list[int]]:
    """The k = `keep` most salient experts as centroids, each with its nearest unassigned non-centroids (at
    most `group_size` − 1), visited from the most salient. Groups list the centroid first, then members by
    distance; ties go to the lower id. Every expert ends in exactly one group."""
    n = sal.numel()
    if not 1 <= keep <= n:
        raise UsageError(f"REAM keeps between 1 and {n} experts per layer, got {keep}")
    if group_size < 2 or keep * (group_size - 1) < n - keep:
        need = math.ceil((n - keep) / keep) + 1
        raise UsageError(f"REAM's groups of {group_size} cannot absorb {n - keep} experts into {keep} centroids: "
                         f"use a group size of at least {need}")
    order = torch.sort(-sal, stable=True).indices.tolist()
    centroids = order[:keep]
    free = sorted(order[keep:])
    out = []
    for c in centroids:
        take = sorted(free, key=lambda e: (float(dist[c, e]), e))[: group_size - 1]
        free = [e for e in free if e not in take]
        out.append([c, *take])
    return out
