"""The KV-cache argument under both of its `transformers` 5.x names.

transformers 5.24 renamed the forward argument and output field `past_key_values` to `cache`; the
old name still works there with a warning and goes away in 5.40. moetrim supports every 5.x, so
decode loops pass the cache under whichever name the model's forward declares.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


@functools.lru_cache(maxsize=None)
def _cache_name(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """{name: cache} for `model(...)`, under the name this model's forward takes."""
    return {_cache_name(type(model)): cache}


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned (`output.cache`, or `output.past_key_values` before 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
