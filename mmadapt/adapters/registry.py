"""Adapter variants by name: one ``register_adapter`` call per variant file."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from .base import Adapter, AdapterSpec

ADAPTERS: dict[str, type[Adapter]] = {}
_RESERVED = {
    "flora": "'flora' is ambiguous; choose flora_opt (optimizer), flora_tucker (N-dim Tucker) or flora_batched (per-example)",
}


def register_adapter(name: str, *aliases: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator adding an adapter variant under ``name`` and ``aliases``."""

    def add(cls: type[Adapter]) -> type[Adapter]:
        for key in (name, *aliases):
            if key in ADAPTERS or key in _RESERVED:
                raise ValueError(f"adapter name {key!r} is already registered")
            ADAPTERS[key] = cls
        return cls

    return add


def adapter_class(name: str) -> type[Adapter]:
    """Look up a variant; unknown names get the nearest registered name in the error."""
    if name in _RESERVED:
        raise ValueError(_RESERVED[name])
    if name not in ADAPTERS:
        nearest = difflib.get_close_matches(name, ADAPTERS, n=1)
        hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
        raise ValueError(f"unknown adapter type {name!r}{hint}; registered: {sorted(ADAPTERS)}")
    return ADAPTERS[name]


def parse_spec(entry: dict) -> AdapterSpec:
    """Validate one config entry against its variant's spec model."""
    if not isinstance(entry, dict) or "type" not in entry:
        raise ValueError(f"each adapter entry needs a 'type' key, got {entry!r}")
    return adapter_class(entry["type"]).spec_class.model_validate(entry)
