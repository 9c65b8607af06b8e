"""Training: one engine on transformers.Trainer and the fine-tuning methods it composes."""

from moetrim.train.config import BIAS_MODES, METHODS, FinetuneConfig

__all__ = ["BIAS_MODES", "METHODS", "FinetuneConfig", "FinetuneResult", "finetune"]


def __getattr__(name: str):
    if name in ("finetune", "FinetuneResult"):  # torch and transformers load only when training
        from moetrim.train import engine

        return getattr(engine, name)
    raise AttributeError(name)
