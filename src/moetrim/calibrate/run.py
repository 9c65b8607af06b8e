"""The calibration loop: stream batches through the instrumented model, forward (and backward).

The model may be spread over devices by accelerate (moetrim.checkpoint.placement): each layer's statistics
live on that layer's device. Under torchrun / accelerate launch each process runs its share of the
batches and the sums are all-reduced (moetrim.calibrate.distributed).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from moetrim.calibrate import distributed
from moetrim.calibrate.instrument import LayerRecorder, instrumented, layer_checkpointing
from moetrim.calibrate.profile import MAX_STATS, PROFILE_VERSION, Profile, data_digest
from moetrim.checkpoint.placement import execution_device, input_device, onloaded
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
    target = ids[:, 1:].to(logits.device)
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
    dense_outputs: bool = False,
    grad_checkpoint: bool = False,
    distributed_ok: bool = True,
    progress: bool = False,
) -> Profile:
    """Run calibration data through `model` once and return its Profile.

    data: a .txt/.jsonl path (comma-separated for several), a list of strings, or an iterable of
    input_ids tensors. With fisher=False only a forward pass runs (no gradient statistics).
    grad_magnitude=True also records the trimming paper's per-sequence weight-gradient magnitudes;
    it needs every sequence's weight gradients (about batch-size times the work of one weight
    gradient), so it is off unless asked for. whiten=True also records each expert's input Gram
    Σ x xᵀ [E, H, H] and down_proj's input Gram Σ h hᵀ [E, I, I] (for whitened SVD when replacing
    experts); at H² floats per expert it is off unless asked for. dense_outputs=True also runs every
    expert on every token and sums its outputs [E, H] (HC-SMoE's merge clusters on them): E/k times
    the experts' forward work, so it is off unless asked for.
    grad_checkpoint=True recomputes each decoder layer in the backward pass: the Fisher pass then
    needs about the memory of a forward, for about one more forward of time; the profile is the same.
    A model placed over devices (load_model(device_map=...)) is calibrated where it lies: inputs go
    to the embedding's device, each layer's sums and masks stay on that layer's device.
    Under torchrun / accelerate launch (WORLD_SIZE > 1, or an initialised process group) each process
    takes its share of the batches and every process returns the summed profile, equal to one
    process's; distributed_ok=False calibrates this process's data alone.
    The model is left exactly as it was (modules restored, requires_grad flags restored).
    """
    if fisher_mode not in FISHER_MODES:
        raise UsageError(f"unknown fisher mode '{fisher_mode}'; choose from {', '.join(FISHER_MODES)}")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2 (a sequence needs two tokens to have a loss), got {max_tokens}")
    layers = find_moe_layers(model)
    require_uniform_widths(layers, "calibrate")
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    chunks = select_chunks(data, tokenizer, seq_len=seq_len, max_tokens=max_tokens, seed=seed)
    if grad_magnitude and not fisher:
        raise UsageError("grad-magnitude needs gradients: drop --no-fisher")
    if grad_checkpoint and not fisher:
        raise UsageError("--grad-checkpoint saves memory in the Fisher backward: it does nothing with --no-fisher")
    device = input_device(model)
    recorders = [LayerRecorder(layer, execution_device(layer.experts), fisher, fisher_mode, grad_magnitude, whiten, dense_outputs)
                 for layer in layers]
    for rec in recorders:
        rec.once_per_batch = grad_checkpoint
    with distributed.process_group(device, enabled=distributed_ok) as (rank, world):
        batch_list = batches(chunks, batch_size)[rank::world]  # the same batches as one process, dealt out
        n_tokens = _run(model, recorders, batch_list, device, fisher, progress and rank == 0, several=world > 1)
        if world > 1:
            sums = [t for rec in recorders for k, t in rec.tensors().items() if k.rsplit(".", 1)[-1] not in MAX_STATS]
            maxima = [t for rec in recorders for k, t in rec.tensors().items() if k.rsplit(".", 1)[-1] in MAX_STATS]
            n_tokens = distributed.all_reduce_stats(sums, maxima, n_tokens, device)
    stats: dict[str, torch.Tensor] = {}
    for rec in recorders:
        stats.update({k: v.cpu() for k, v in rec.tensors().items()})
    with onloaded([layer.router for layer in layers]):  # the fingerprint reads router weights, maybe offloaded
        meta = profile_meta(model, layers, chunks, n_tokens, seq_len, fisher=fisher, fisher_mode=fisher_mode,
                            grad_magnitude=grad_magnitude, whiten=whiten, dense_outputs=dense_outputs, processes=world)
    return Profile(stats, meta).validate("calibration")


def _run(model: nn.Module, recorders: list[LayerRecorder], batch_list: list[torch.Tensor], device: torch.device, fisher: bool,
         progress: bool, several: bool) -> int:
    """Forward (and backward) every batch through the instrumented model; returns the token count.
    With several processes, a failure in one is told to the others before anyone all-reduces."""
    grad_checkpoint = fisher and any(rec.once_per_batch for rec in recorders)
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_tokens = 0
    failed = True
    try:
        with instrumented([rec.layer for rec in recorders], recorders), layer_checkpointing(model, grad_checkpoint):
            with progress_bar("calibrating", total=sum(b.numel() for b in batch_list), enabled=progress) as advance:
                for batch in batch_list:
                    ids = batch.to(device)
                    for rec in recorders:
                        rec.start_batch(ids.shape[0], ids.shape[1])
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
        failed = False
    finally:
        for n, p in model.named_parameters():  # disk offload can untie a weight: a name not seen before stays frozen
            p.requires_grad_(flags.get(n, False))
        model.train(was_training)
        if several:
            distributed.agree_no_failure(failed, device)
    return n_tokens


def select_chunks(data: DataSource, tokenizer, *, seq_len: int, max_tokens: int | None, seed: int) -> list[torch.Tensor]:
    """The calibration sequences: the data cut into seq_len chunks, and a seeded choice of them when
    the data holds more than max_tokens (the same on every process and in every calibration mode)."""
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
    return chunks


def profile_meta(model: nn.Module, layers, chunks, n_tokens: int, seq_len: int, *, fisher: bool, fisher_mode: str,
                 grad_magnitude: bool, whiten: bool, dense_outputs: bool = False, processes: int = 1) -> dict[str, str]:
    """The profile's metadata: what it was measured on and how (every calibration mode writes the same keys)."""
    return {
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
        "dense_outputs": "true" if dense_outputs else "false",
        "hidden_size": str(layers[0].hidden_size),
        "processes": str(processes),
    }


def model_context(model: nn.Module) -> int | None:
    """The longest sequence the model was built for, if its config says (max_position_embeddings, or
    the older names n_positions, max_sequence_length, seq_length)."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return int(n)
    return None


def default_seq_len(model: nn.Module) -> int:
    """512 tokens, or the model's context when that is shorter."""
    ctx = model_context(model)
    return min(DEFAULT_SEQ_LEN, ctx) if ctx else DEFAULT_SEQ_LEN
