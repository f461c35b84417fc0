"""Modality-masked adapters: contract, registry, injection, and the variants."""

from ..modality import disable_adapters, example_adapters, modality_ids
from . import allora, bilora, dora, flora_batched, flora_opt, flora_tucker, loldu, lora, lora_pro, lora_sp, melora, miss, periodic_lora, plora, prilora, trp  # noqa: F401  (each registers its variant)
from .base import Adapter, AdapterSpec
from .inject import adapter_parameters, adapters_of, inject
from .merge import merge, unmerge
from .peft_export import export_peft
from .registry import ADAPTERS, adapter_class, parse_spec, register_adapter

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterSpec",
    "adapter_class",
    "adapter_parameters",
    "adapters_of",
    "disable_adapters",
    "example_adapters",
    "export_peft",
    "inject",
    "merge",
    "modality_ids",
    "parse_spec",
    "register_adapter",
    "unmerge",
]
