"""`transformers` Auto classes for moetrim's own checkpoint formats, registered when moetrim is imported.

A moetrim checkpoint (variable-width, replaced or rerouted experts) has a `model_type` of its own so
that plain `transformers` refuses it rather than load random experts. Once `moetrim` is imported,
`AutoConfig` / `AutoModelForCausalLM.from_pretrained(DIR)` load it by path through `moetrim.load`,
so tools that take a path (lm-eval's `hf` model, a training script) work after `import moetrim`.

Registering needs `transformers.models.auto`, a 3-second import; `import moetrim` does not pay it:
the registration runs when transformers is already imported, or right after it is imported later.
"""

from __future__ import annotations

import importlib.abc
import sys

MODEL_TYPES = ("moetrim_varwidth", "moetrim_replaced", "moetrim_routed")
_done = False


def _from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    """Load through moetrim.load: the family's model with moetrim's experts or routing restored."""
    import torch

    from moetrim.checkpoint import load_model

    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", "auto"))
    device_map = kwargs.get("device_map")
    device = "cuda" if device_map in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    return load_model(pretrained_model_name_or_path, dtype=dtype, device=device,
                      trust_remote_code=bool(kwargs.get("trust_remote_code", False)))


def register_auto_classes() -> None:
    """Register moetrim's model types with AutoConfig and AutoModelForCausalLM (idempotent)."""
    global _done
    if _done:
        return
    _done = True
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

    for model_type in MODEL_TYPES:
        name = "".join(part.capitalize() for part in model_type.split("_"))
        config_cls = type(f"{name}Config", (PretrainedConfig,), {"model_type": model_type, "__module__": __name__})
        model_cls = type(f"{name}ForCausalLM", (PreTrainedModel,), {
            "config_class": config_cls, "__module__": __name__, "from_pretrained": classmethod(_from_pretrained),
            "__doc__": f"Loads a {model_type} checkpoint through moetrim.load (never instantiated itself)."})
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Registers the Auto classes once `transformers` has been imported (then steps aside)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            try:
                register_auto_classes()
            except Exception:  # a transformers without these Auto APIs: moetrim.load still works
                pass

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if transformers is imported, else as soon as it is."""
    if "transformers" in sys.modules:
        register_auto_classes()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
