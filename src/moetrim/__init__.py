"""moetrim: make Mixture-of-Experts language models smaller and faster while keeping what they can do.

The whole pipeline is profile -> plan -> apply:

    model = moetrim.load("path/to/moe")                     # any transformers 5.x MoE checkpoint
    profile = moetrim.calibrate(model, "calib.txt", tokenizer=tok)
    plan = moetrim.make_plan(model, profile, granularity="dims", criterion="fisher", ratio=0.5)
    moetrim.apply_plan(model, plan)                         # real smaller tensors, in place
    moetrim.save(model, "out", tokenizer=tok, plan=plan, profile=profile)

and fine-tuning keeps what rarely used experts know (moetrim.train):

    result = moetrim.finetune(model, tok, "sft.jsonl", method="condenser", lr=1e-5, epochs=1)
    moetrim.save(result.model, "tuned", tokenizer=tok)
"""

from moetrim.build import apply_plan
from moetrim.calibrate import Profile, calibrate, load_profile
from moetrim.checkpoint import load_model as load
from moetrim.checkpoint import load_tokenizer
from moetrim.checkpoint import save_checkpoint as save
from moetrim.errors import MoetrimError, UsageError
from moetrim.model import find_moe_layers, routed_expert_param_count
from moetrim.plan import Plan, load_plan, make_plan
from moetrim.train import FinetuneConfig

__version__ = "0.1.0"

from moetrim.integrations.auto import install as _install_auto_classes  # noqa: E402

_install_auto_classes()  # AutoModelForCausalLM.from_pretrained(DIR) loads moetrim checkpoints once moetrim is imported


def finetune(model, tokenizer, data, config: "FinetuneConfig | None" = None, **settings):
    """Fine-tune an MoE model in place with one method (see moetrim.train.finetune); returns
    FinetuneResult(model, report)."""
    from moetrim.train import finetune as _finetune

    return _finetune(model, tokenizer, data, config, **settings)


def reference_model(*args, **kwargs):
    """A bundled reference model and its tokenizer: ``reference_model()`` the first, ``reference_model("longtail")``
    the long-tail Qwen3-MoE (see moetrim.assets)."""
    from moetrim.assets import reference_model as _ref

    return _ref(*args, **kwargs)


__all__ = [
    "FinetuneConfig",
    "Profile",
    "Plan",
    "MoetrimError",
    "UsageError",
    "apply_plan",
    "calibrate",
    "find_moe_layers",
    "finetune",
    "load",
    "load_plan",
    "load_profile",
    "load_tokenizer",
    "make_plan",
    "reference_model",
    "routed_expert_param_count",
    "save",
]
