"""The calibration loop: stream batches through the instrumented model, forward (and backward)."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from moetrim.calibrate.instrument import LayerRecorder, instrumented
from moetrim.calibrate.profile import PROFILE_VERSION, Profile, data_digest
from moetrim.data.text import DataSource, batches, token_chunks
from moetrim.errors import UsageError
from moetrim.model.identity import model_fingerprint
from moetrim.model.view import find_moe_layers, require_uniform_widths
from moetrim.progress import progress_bar

FISHER_MODES = ("sequence", "batch")
DEFAULT_SEQ_LEN = 512


def _sequence_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ over sequences of each sequence's mean next-token loss: its gradient w.r.t. sequence s's
    mask copy is exactly ∂L_s/∂m."""
    logits = logits[:, :-1].float()
    target = ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(target.shape).mean(dim=1).sum()


def _base_model(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", "model"), model)


def calibrate(
    model: nn.Module,
    data: DataSource,
    *,
    tokenizer=None,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    fisher: bool = True,
    fisher_mode: str = "sequence",
    grad_magnitude: bool = False,
    whiten: bool = False,
    progress: bool = False,
) -> Profile:
    """Run calibration data through `model` once and return its Profile.

    data: a .txt/.jsonl path (comma-separated for several), a list of strings, or an iterable of
    input_ids tensors. With fisher=False only a forward pass runs (no gradient statistics).
    grad_magnitude=True also records the trimming paper's per-sequence weight-gradient magnitudes;
    it needs every sequence's weight gradients (about batch-size times the work of one weight
    gradient), so it is off unless asked for. whiten=True also records each expert's input Gram
    Σ x xᵀ [E, H, H] (for whitened SVD when replacing experts); at H² floats per expert it is off
    unless asked for.
    The model is left exactly as it was (modules restored, requires_grad flags restored).
    """
    if fisher_mode not in FISHER_MODES:
        raise UsageError(f"unknown fisher mode '{fisher_mode}'; choose from {', '.join(FISHER_MODES)}")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2 (a sequence needs two tokens to have a loss), got {max_tokens}")
    layers = find_moe_layers(model)
    require_uniform_widths(layers, "calibrate")
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    chunks = token_chunks(data, tokenizer, seq_len=seq_len, max_tokens=None)
    if not chunks:
        raise UsageError("calibration data is empty: no sequence of at least 2 tokens")
    if max_tokens is not None:
        # A seeded choice of which chunks to use when the data holds more than the budget.
        order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
        picked, total = [], 0
        for i in order:
            if total >= max_tokens:
                break
            piece = chunks[i][: max_tokens - total]
            if piece.numel() >= 2:
                picked.append((i, piece))
                total += piece.numel()
        chunks = [c for _, c in sorted(picked, key=lambda t: t[0])]
        if not chunks:
            raise UsageError(f"--max-tokens {max_tokens} leaves no sequence of at least 2 tokens; raise it")
    device = next(model.parameters()).device
    if grad_magnitude and not fisher:
        raise UsageError("grad-magnitude needs gradients: drop --no-fisher")
    recorders = [LayerRecorder(layer, device, fisher, fisher_mode, grad_magnitude, whiten) for layer in layers]
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_tokens = 0
    try:
        with instrumented(layers, recorders):
            batch_list = batches(chunks, batch_size)
            with progress_bar("calibrating", total=sum(b.numel() for b in batch_list), enabled=progress) as advance:
                for batch in batch_list:
                    ids = batch.to(device)
                    for rec in recorders:
                        rec.start_batch(ids.shape[0], ids.shape[1], device)
                    if fisher:
                        with torch.enable_grad():
                            logits = model(input_ids=ids, use_cache=False).logits
                            _sequence_loss(logits, ids).backward()
                        del logits
                    else:
                        with torch.no_grad():
                            _base_model(model)(input_ids=ids, use_cache=False)
                    for rec in recorders:
                        rec.finish_batch()
                    n_tokens += ids.numel()
                    advance(ids.numel())
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    stats: dict[str, torch.Tensor] = {}
    for rec in recorders:
        stats.update({k: v.cpu() for k, v in rec.tensors().items()})
    meta = {
        "moetrim_profile": PROFILE_VERSION,
        "model_fingerprint": model_fingerprint(model),
        "model_type": str(getattr(model.config, "model_type", "")),
        "tokens": str(n_tokens),
        "sequences": str(len(chunks)),
        "seq_len": str(seq_len),
        "data_digest": data_digest(chunks),
        "fisher": "true" if fisher else "false",
        "fisher_mode": fisher_mode if fisher else "",
        "grad_magnitude": "true" if fisher and grad_magnitude else "false",
        "whiten": "true" if whiten else "false",
        "hidden_size": str(layers[0].hidden_size),
    }
    return Profile(stats, meta).validate("calibration")


def model_context(model: nn.Module) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings), if its config says."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def default_seq_len(model: nn.Module) -> int:
    """512 tokens, or the model's context when that is shorter."""
    ctx = model_context(model)
    return min(DEFAULT_SEQ_LEN, ctx) if ctx else DEFAULT_SEQ_LEN
