"""Fold adapters into their base weights, where that keeps the model's outputs.

A merged weight is seen by every token, so an adapter merges exactly only when it
fires on every modality the model can see: a text-and-image LoRA merges into a
vision-language model, an image-only PLoRA does not (text rows would change).
"""

from __future__ import annotations

import warnings

from torch import nn

from ..modality import MODALITIES, TEXT
from .base import Adapter
from .inject import adapters_of


def visible_modalities(model: nn.Module) -> frozenset[int]:
    """Text, plus each encoder's modality (``MultimodalLM``) or each adapter's (a bare LLM)."""
    encoders = getattr(model, "encoders", None)
    if encoders is not None:
        return frozenset({TEXT, *(MODALITIES[name] for name in encoders)})
    return frozenset({TEXT}).union(*(adapter.modalities for _, adapter in adapters_of(model)))


def merge(model: nn.Module, strict: bool = True) -> list[str]:
    """Fold every adapter of ``model`` into its base layer.

    Args:
        model: a ``MultimodalLM`` or an injected HF model.
        strict: refuse (and change nothing) when some adapter cannot merge exactly;
            when False, merge the others and warn naming the ones left unmerged.

    Returns:
        The full names of the merged adapters.

    Raises:
        ValueError: ``strict`` and an adapter covers only some modalities or has no
            exact merged form; the message names each such adapter and why.
    """
    seen = visible_modalities(model)
    chosen, refused = [], {}
    for name, adapter in adapters_of(model):
        reason = _refusal(adapter, seen)
        if reason:
            refused[_short(name)] = reason
        elif not adapter.merged:
            chosen.append((name, adapter))
    if refused:
        listing = "; ".join(f"{name}: {reason}" for name, reason in refused.items())
        if strict:
            raise ValueError(f"cannot merge exactly: {listing}")
        warnings.warn(f"left unmerged: {listing}", stacklevel=2)
    for _, adapter in chosen:
        adapter.merge()
    return [name for name, _ in chosen]


def unmerge(model: nn.Module) -> list[str]:
    """Take every merged adapter of ``model`` back out of its base layer."""
    merged = [(name, adapter) for name, adapter in adapters_of(model) if adapter.merged]
    for _, adapter in merged:
        adapter.unmerge()
    return [name for name, _ in merged]


def _refusal(adapter: Adapter, seen: frozenset[int]) -> str | None:
    if not adapter.mergeable:
        return f"{adapter.spec.type} has no exact merged form"
    if not isinstance(adapter.base_layer.weight, nn.Parameter):
        return "its base layer computes its weight (a LoRD-factored layer): there is no stored weight to merge into"
    missing = seen - adapter.modalities
    if missing:
        names = sorted(name for name, index in MODALITIES.items() if index in missing)
        return f"fires on {adapter.spec.modalities} but the model also sees {names}"
    return None


def _short(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.mmadapt.lora`` -> ``lora`` (one entry per adapter key)."""
    return name.rsplit(".", 1)[-1]
