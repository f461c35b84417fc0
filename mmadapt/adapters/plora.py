"""Partial LoRA (InternLM-XComposer2): LoRA that fires only on modality tokens.

Every mmadapt adapter is restricted to the rows of its modalities, so Partial LoRA
is :class:`~mmadapt.adapters.lora.LoRA` under the name XComposer2 gives it; the
parameters keep LoRA's names (``lora_A``, ``lora_B``). B starts at zero, so the
adapted model equals the base model until training moves it. (XComposer2's released
code means to zero B as well, but its init never runs.)
"""

from __future__ import annotations

from .lora import LoRA
from .registry import register_adapter


@register_adapter("plora")
class PLoRA(LoRA):
    """LoRA on image/speech rows, under XComposer2's name (the math is LoRA's)."""
