"""Training, beside the compression stages: one engine on transformers.Trainer (engine) and the
fine-tuning methods it composes (full, auxfree, esft, densemixer, condenser; recover for compressed
models), each a small piece the engine switches on by name (config.METHODS). finetune and recover
are the verbs; resumable checkpoints (checkpoints) and the training data (data) serve them."""

from moetrim.train.config import BIAS_MODES, METHODS, FinetuneConfig

__all__ = ["BIAS_MODES", "METHODS", "FinetuneConfig", "FinetuneResult", "finetune", "recover"]


def __getattr__(name: str):
    if name in ("finetune", "FinetuneResult"):  # torch and transformers load only when training
        from moetrim.train import engine

        return getattr(engine, name)
    raise AttributeError(name)


def recover(model, tokenizer, data, *, teacher=None, **settings):
    """Win back what compression cost by training only what it created (replaced experts' corrections
    and bases; LoRA adapters with lora=R, the one option for pruned or trimmed models), annealed from
    `teacher`, the uncompressed model: its outputs blend out and its distillation loss fades (anneal
    "blend,kd", the default; "none" needs no teacher). router_only=True is Router KD: only the routers
    train, on the distillation loss alone (any compressed model; needs the teacher). What `moetrim
    recover` runs; settings are FinetuneConfig's (max_steps, lr, anneal, blend_fraction, kd_weight, lora,
    router_only, batch_size, seq_len, seed, ...). Returns FinetuneResult(model, report).

    >>> result = moetrim.recover(compressed, tok, "sft.jsonl", teacher=original, max_steps=200, lr=1e-4)
    >>> result.report["steps"]
    200
    """
    from moetrim.train.engine import finetune

    cfg = FinetuneConfig(method="recover", **settings)
    cfg.check()
    return finetune(model, tokenizer, data, cfg, teacher=teacher)
