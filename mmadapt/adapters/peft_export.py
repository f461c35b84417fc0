"""Export text-modality LoRA, DoRA and MiSS adapters in PEFT's own format.

``peft.PeftModel.from_pretrained(base_llm, folder)`` then gives the logits mmadapt
gives on text-only input. Each mmadapt adapter key (``lora``, ``dora``, a config's
``name``) becomes one PEFT adapter folder holding ``adapter_config.json`` (written
by PEFT's own config class) and ``adapter_model.safetensors`` (PEFT's key names,
e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``):

    path/                   when exactly one adapter key is exported
    path/<key>/             one folder per key when there are several

A key is exported when its variant has a PEFT twin (``lora``/``plora``, ``dora``,
``miss``/``bone``) and it fires on text rows (an adapter on text and image rows acts
on every token of a text-only input, which is what PEFT does).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, MissConfig, PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..errors import InputError
from ..export import gathered_state
from .base import Adapter
from .dora import DoRA
from .inject import STACK_ATTR, adapters_of
from .lora import LoRA, LoRASpec
from .miss import MiSS, MiSSSpec
from .plora import PLoRA

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names


def _lora_config(spec: LoRASpec, targets: list[str], use_dora: bool = False) -> LoraConfig:
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=spec.use_rslora,
        use_dora=use_dora,
        target_modules=targets,
    )


def _miss_config(spec: MiSSSpec, targets: list[str]) -> MissConfig:
    init_weights = {"balance": True, "bat": "bat", "mini": "mini"}[spec.variant]
    return MissConfig(
        r=spec.r, miss_dropout=spec.dropout, mini_r=spec.mini_r, init_weights=init_weights, target_modules=targets
    )


@dataclass(frozen=True)
class PeftFormat:
    """How one variant is written: its PEFT config, and its tensor names as PEFT saves them."""

    config: Callable[..., PeftConfig]
    tensor_names: dict[str, str]  # mmadapt parameter name -> PEFT key suffix


_LORA_TENSORS = {"lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight"}
# Exact classes, not isinstance: a subclass that adds state (say an accumulator) is not plain LoRA.
PEFT_FORMATS: dict[type[Adapter], PeftFormat] = {
    LoRA: PeftFormat(_lora_config, _LORA_TENSORS),
    PLoRA: PeftFormat(_lora_config, _LORA_TENSORS),
    DoRA: PeftFormat(
        functools.partial(_lora_config, use_dora=True), {**_LORA_TENSORS, "magnitude": "lora_magnitude_vector"}
    ),
    MiSS: PeftFormat(_miss_config, {"miss_block": "miss_block"}),
}


@dataclass
class _Placed:
    """One adapter key: its adapters' full module names and the layers they sit in."""

    adapter: Adapter  # the first one; every adapter of a key shares its spec and class
    adapter_names: list[str]
    layer_names: list[str]


def export_peft(model: nn.Module, path: str | Path) -> dict[str, Path]:
    """Write the text-modality ``lora``/``dora``/``miss`` adapters of ``model`` as PEFT adapters.

    Args:
        model: a ``MultimodalLM`` (its ``.llm`` is exported) or an injected HF model.
        path: the PEFT adapter folder, or the parent of one folder per adapter key
            when several keys are exported (see the module docstring).

    Returns:
        The folder written for each exported adapter key.

    Raises:
        InputError: no adapter of ``model`` can be exported. Adapters that are skipped
            (other modalities, variants PEFT lacks) are named in a warning.
    """
    llm = getattr(model, "llm", model)
    placed = _adapters_by_key(llm)
    skipped = {key: reason for key, entry in placed.items() if (reason := _skip_reason(entry.adapter))}
    exported = {key: entry for key, entry in placed.items() if key not in skipped}
    if skipped:
        listing = "; ".join(f"{key}: {reason}" for key, reason in skipped.items())
        warnings.warn(f"export_peft skipped {len(skipped)} adapter(s): {listing}", stacklevel=2)
    if not exported:
        found = ", ".join(placed) or "none"
        raise InputError(
            f"export_peft: nothing to export to {path}: PEFT takes text-modality lora, dora and miss adapters "
            f"(adapters found: {found})"
        )
    root = Path(path)
    folders = {key: root if len(exported) == 1 else root / key for key in exported}
    for key, entry in exported.items():
        _write(llm, entry, folders[key])
    return folders


def _adapters_by_key(llm: nn.Module) -> dict[str, _Placed]:
    placed: dict[str, _Placed] = {}
    for name, adapter in adapters_of(llm):
        layer_name, key = name.rsplit(f".{STACK_ATTR}.", 1)
        entry = placed.setdefault(key, _Placed(adapter, [], []))
        entry.adapter_names.append(name)
        entry.layer_names.append(layer_name)
    return placed


def _skip_reason(adapter: Adapter) -> str | None:
    if type(adapter) not in PEFT_FORMATS:
        return f"{adapter.spec.type} has no PEFT format"
    if "text" not in adapter.spec.modalities:
        return f"{adapter.spec.type} fires on {adapter.spec.modalities}, not on text"
    return None


def _write(llm: nn.Module, entry: _Placed, folder: Path) -> None:
    peft_format = PEFT_FORMATS[type(entry.adapter)]
    config = peft_format.config(entry.adapter.spec, entry.layer_names)
    config.base_model_name_or_path = getattr(llm, "name_or_path", None) or None
    config.task_type = "CAUSAL_LM" if type(llm).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() else None
    config.inference_mode = True  # as PEFT's own save_pretrained writes it
    keys = {
        f"{adapter_name}.{param}": f"{PEFT_PREFIX}{layer_name}.{suffix}"
        for adapter_name, layer_name in zip(entry.adapter_names, entry.layer_names)
        for param, suffix in peft_format.tensor_names.items()
    }
    tensors = {keys[name]: tensor for name, tensor in gathered_state(llm, set(keys)).items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
