"""Names that changed inside transformers 5.x, resolved for the installed version.

``pyproject.toml`` allows any transformers 5; between 5.17 (still in GPU images) and
5.24 two names used here changed, and an old release takes the new keyword silently
into ``**kwargs`` instead of failing:

- the KV cache's keyword of ``forward``: ``past_key_values`` became ``cache``;
- ``gradient_checkpointing_enable/disable`` became ``activation_checkpointing_enable/disable``
  (the old names remain as deprecated aliases, warning on every call).
"""

from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.cache
def cache_argument(model_class: type) -> str:
    """The KV cache's keyword in ``model_class.forward``: ``cache`` or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def set_activation_checkpointing(model: nn.Module, enable: bool = True, use_reentrant: bool | None = None) -> None:
    """Turn activation checkpointing of a transformers model's layers on or off."""
    if enable:
        kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
