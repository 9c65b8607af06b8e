"""moetrim: make Mixture-of-Experts language models smaller and faster while keeping what they can do.

One verb per command. Compressing is calibrate -> plan -> build, in one call or stage by stage:

    model, tok = moetrim.load("path/to/moe"), moetrim.load_tokenizer("path/to/moe")
    result = moetrim.compress(model, "calib.txt", method="dims", ratio=0.5, tokenizer=tok)
    moetrim.save(result.model, "out", tokenizer=tok, plan=result.plan, profile=result.profile)

    profile = moetrim.calibrate(model, "calib.txt", tokenizer=tok)
    plan = moetrim.make_plan(model, profile, granularity="merge", ratio=0.25)   # dims, experts, replace, naive, merge, d2
    moetrim.apply_plan(model, plan, profile)                                      # real smaller tensors, in place

Fine-tuning keeps what rarely used experts know, and recovery wins back what compression cost:

    result = moetrim.finetune(model, tok, "sft.jsonl", method="condenser", lr=1e-5, epochs=1)
    result = moetrim.recover(compressed, tok, "sft.jsonl", teacher=original, max_steps=200)

and measuring: moetrim.evaluate(model, tok, tasks="math"), moetrim.routing_health(model, tok, "data.txt").
"""

import moetrim.evaluate  # noqa: F401  (the stage package first: the verb `evaluate` below then names the function)
from moetrim.apply import ApplyResult, apply_plan
from moetrim.calibrate import Profile, calibrate, load_profile
from moetrim.checkpoint import load_model as load
from moetrim.checkpoint import load_tokenizer
from moetrim.checkpoint import save_checkpoint as save
from moetrim.errors import MoetrimError, UsageError
from moetrim.evaluate.routing import routing_health
from moetrim.model import find_moe_layers, routed_expert_param_count
from moetrim.pipeline.compress import CompressResult, compress
from moetrim.pipeline.evaluate import evaluate
from moetrim.plan import Plan, ReplacePlan, load_plan, make_plan, make_replace_plan, make_slicing_plan
from moetrim.train import FinetuneConfig, recover

__version__ = "0.1.0"

from moetrim.integrations.auto import install as _install_auto_classes  # noqa: E402

_install_auto_classes()  # AutoModelForCausalLM.from_pretrained(DIR) loads moetrim checkpoints once moetrim is imported


def finetune(model, tokenizer, data, config: "FinetuneConfig | None" = None, **settings):
    """Fine-tune an MoE model in place with one method (see moetrim.train.finetune); returns
    FinetuneResult(model, report).

    >>> result = moetrim.finetune(model, tok, "sft.jsonl", method="esft", max_steps=100)
    >>> moetrim.save(result.model, "tuned", tokenizer=tok)
    """
    from moetrim.train import finetune as _finetune

    return _finetune(model, tokenizer, data, config, **settings)


def reference_model(*args, **kwargs):
    """A bundled reference model and its tokenizer: ``reference_model()`` the first, ``reference_model("longtail")``
    the long-tail Qwen3-MoE (see moetrim.assets).

    >>> model, tok = moetrim.reference_model()
    """
    from moetrim.assets import reference_model as _ref

    return _ref(*args, **kwargs)


__all__ = [
    "ApplyResult",
    "CompressResult",
    "FinetuneConfig",
    "MoetrimError",
    "Plan",
    "Profile",
    "ReplacePlan",
    "UsageError",
    "apply_plan",
    "calibrate",
    "compress",
    "evaluate",
    "find_moe_layers",
    "finetune",
    "load",
    "load_plan",
    "load_profile",
    "load_tokenizer",
    "make_plan",
    "make_replace_plan",
    "make_slicing_plan",
    "recover",
    "reference_model",
    "routed_expert_param_count",
    "routing_health",
    "save",
]
