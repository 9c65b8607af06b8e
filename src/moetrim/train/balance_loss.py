"""transformers' load-balancing loss for `--method full`, computed so that N processes equal one.

transformers 5.x (`load_balancing_loss_func`, the same in Qwen2/3-MoE, Mixtral, OLMoE and GPT-OSS)
sums over the MoE layers and the real tokens of the batch

    f_e = sum 1[e in top-k(t)] / R,   P_e = sum p_e(t) / R,   R = layers x real tokens,
    loss = E * sum_e f_e * P_e

a product of two batch means. Each process computing it on its own share, with DDP averaging the
gradients, is not the loss of the whole batch (the mean of products is not the product of means).
Here the selection counts and R are summed over the processes (they carry no gradient, in
transformers either: top-k has none), and each process keeps its own probability sum: its term

    E / R^2 * sum_e counts_e * P_local,e

adds up over the processes to the whole-batch loss, and its gradient is the process's share of the
whole batch's. The Trainer's DDP averages gradients over the processes, so the term is multiplied by
their number: the optimizer sees the one-process gradient and the log the one-process loss. In one
process this is transformers' loss exactly (tests/test_finetune.py checks it against the model's own
`aux_loss`).
"""

from __future__ import annotations

import torch


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def balance_loss(router_logits, num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """This process's term of the whole-batch load-balancing loss (see the module docstring), already
    multiplied by the number of processes that DDP averages over; router_logits: one [T, E] per MoE layer."""
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros(1, dtype=torch.float32, device=device)
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for logits in router_logits:
        p = torch.softmax(logits.to(device).float(), dim=-1)
        top = torch.topk(p, top_k, dim=-1).indices
        if mask is None:
            counts = counts.index_add(0, top.reshape(-1), torch.ones(top.numel(), device=device))
            probs = probs + p.sum(dim=0)
            rows = rows + p.shape[0]
        else:
            counts = counts.index_add(0, top.reshape(-1), mask.repeat_interleave(top_k))
            probs = probs + (p * mask.unsqueeze(-1)).sum(dim=0)
            rows = rows + mask.sum()
    world = 1
    if _distributed():
        world = torch.distributed.get_world_size()
        both = torch.cat([counts, rows]).detach()
        torch.distributed.all_reduce(both)
        counts, rows = both[:num_experts], both[num_experts:]
    return world * num_experts * (counts.detach() * probs).sum() / (rows * rows).squeeze()
