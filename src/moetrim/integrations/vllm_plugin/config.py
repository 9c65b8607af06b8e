"""The config side of the plugin: what `AutoConfig` returns for a `moetrim_varwidth` config.json (and a
`moetrim_replaced` or `moetrim_routed` one, served through the same model class).

vLLM parses config.json through transformers' AutoConfig before any model code runs, and picks the
model class from `config.architectures`. For a variable-width checkpoint we return an instance of a
subclass of the base family's own config class (so every field, default and derived attribute vLLM reads
is the family's, and `model_type` is the family's), with `architectures` naming the plugin's model.
The subclasses are module attributes created on first use, so pickling a config between vLLM's
processes finds them by name. Only transformers is imported here.
"""

from __future__ import annotations

import sys

from transformers import PretrainedConfig

from moetrim.integrations.vllm_plugin.families import family
from moetrim.model.replaced import REPLACED_KEY, REPLACED_MODEL_TYPE
from moetrim.model.routing import ROUTED_MODEL_TYPE, ROUTING_KEY
from moetrim.model.varwidth import VARWIDTH_KEY


MODEL_TYPE = "moetrim_varwidth"
BASE_KEY = "moetrim_base_model_type"
_PREFIX = "MoetrimVarwidthConfig_"


class MoetrimVarwidthConfig(PretrainedConfig):
    """Registered for model_type 'moetrim_varwidth'; builds the base family's config (see module doc)."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        return _family_config(config_dict, MODEL_TYPE, VARWIDTH_KEY, **kwargs)


def _family_config(config_dict: dict, model_type: str, record_key: str, **kwargs):
    """The base family's config (a subclass carrying moetrim's record) naming the plugin's model class."""
    base = config_dict.get(BASE_KEY)
    fam = family(base)  # an unsupported family fails here, in one line
    if not isinstance(config_dict.get(record_key), dict):
        raise ValueError(f"config.json says {model_type} but has no '{record_key}' record")
    d = {k: v for k, v in config_dict.items() if k not in ("model_type", BASE_KEY)}
    d["architectures"] = [fam.plugin_architecture]
    return config_class(base).from_dict(d, **kwargs)


class MoetrimReplacedConfig(PretrainedConfig):
    """Registered for model_type 'moetrim_replaced': the base family's config naming the plugin's model,
    which rebuilds every replaced expert as stock weights at load (see `replaced.py`)."""

    model_type = REPLACED_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        return _family_config(config_dict, REPLACED_MODEL_TYPE, REPLACED_KEY, **kwargs)


class MoetrimRoutedConfig(PretrainedConfig):
    """Registered for model_type 'moetrim_routed': the base family's config naming the plugin's model, which
    routes every MoE layer with the checkpoint's bias and condensers (see `routed.py`)."""

    model_type = ROUTED_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        return _family_config(config_dict, ROUTED_MODEL_TYPE, ROUTING_KEY, **kwargs)


def config_class(base_type: str) -> type:
    """The subclass of `base_type`'s config class that carries the variable-width record."""
    name = _PREFIX + base_type
    module = sys.modules[__name__]
    if name not in vars(module):
        from transformers import AutoConfig

        base_cls = type(AutoConfig.for_model(base_type))
        cls = type(name, (base_cls,), {"__module__": __name__, "__qualname__": name,
                                       "__doc__": f"{base_type} config of a moetrim variable-width checkpoint."})
        setattr(module, name, cls)
        _route_auto_model(cls)
    return vars(module)[name]


def _route_auto_model(config_cls: type) -> None:
    """AutoModelForCausalLM.from_pretrained(DIR) in a process with the plugin still loads through
    moetrim.load (the Auto class maps config classes by exact type)."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from moetrim.integrations.auto import _from_pretrained

    model_cls = type(config_cls.__name__.replace("Config", "ForCausalLM"), (PreTrainedModel,), {
        "config_class": config_cls, "__module__": __name__, "from_pretrained": classmethod(_from_pretrained)})
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def __getattr__(name: str):  # PEP 562: unpickling in a fresh process creates the class on demand
    if name.startswith(_PREFIX):
        return config_class(name[len(_PREFIX):])
    raise AttributeError(name)


def register_config() -> None:
    """Make AutoConfig build the plugin's configs for 'moetrim_varwidth' (and keep transformers loading
    such a checkpoint by path through moetrim.load, not as a stock model with random experts)."""
    import moetrim  # noqa: F401  (registers moetrim's own Auto classes first, so ours replace them)
    from moetrim.integrations.auto import register_auto_classes
    from transformers import AutoConfig

    register_auto_classes()
    AutoConfig.register(MODEL_TYPE, MoetrimVarwidthConfig, exist_ok=True)
    AutoConfig.register(REPLACED_MODEL_TYPE, MoetrimReplacedConfig, exist_ok=True)
    AutoConfig.register(ROUTED_MODEL_TYPE, MoetrimRoutedConfig, exist_ok=True)
