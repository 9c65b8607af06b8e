"""vLLM plugin: serve moetrim's variable-width checkpoints (install `moetrim[vllm]`; nothing to call).

vLLM calls `register()` through the `vllm.general_plugins` entry point in every process, before it parses
a config. It registers (1) an AutoConfig class for model_type 'moetrim_varwidth' that turns config.json
into the base family's config naming the plugin's model, and (2) one model class per family with vLLM's
ModelRegistry, imported lazily. How layers are built, and what is measured: docs/serving.md.

register() never raises: if vLLM's internals differ from what this plugin was written against it logs
one warning, and models other than moetrim's are served as before.
"""

from __future__ import annotations

import logging

from moetrim.integrations.vllm_plugin.families import FAMILIES, UnsupportedFamily, family

__all__ = ["register", "family", "UnsupportedFamily", "FAMILIES"]
_log = logging.getLogger("moetrim.vllm")
_registered = False


def register() -> None:
    """Entry point of `vllm.general_plugins` (idempotent, never raises)."""
    global _registered
    if _registered:
        return
    try:
        from vllm import ModelRegistry

        from moetrim.integrations.vllm_plugin.config import register_config

        register_config()
        for fam in FAMILIES.values():
            ModelRegistry.register_model(fam.plugin_architecture,
                                         f"moetrim.integrations.vllm_plugin.models:{fam.plugin_architecture}")
        _registered = True
    except Exception as exc:  # a vLLM or transformers whose internals differ: leave other models alone
        _log.warning("moetrim vLLM plugin not registered (%s: %s); moetrim variable-width checkpoints will not load in vLLM",
                     type(exc).__name__, exc)
