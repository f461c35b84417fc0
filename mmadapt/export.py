"""Trained weights out of a run, and a run's model back in.

``OUT/adapter/adapter.safetensors`` holds every trained tensor (gathered from ZeRO-3
shards), ``OUT/adapter/adapter_config.json`` the format version, preset and base
fingerprint; ``OUT/base.safetensors`` the parts that were randomly initialised
rather than loaded from a named pretrained source.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import InputError

FORMAT_VERSION = 1


def gathered_state(module: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """Full copies of the named parameters/buffers, gathering ZeRO-3 partitions if needed."""
    params = [p for n, p in module.named_parameters() if n in names]
    with _gathered(params):
        # Cloned one by one, so tied tensors become separate copies safetensors can write.
        return {n: t.detach().cpu().clone().contiguous() for n, t in module.state_dict(keep_vars=True).items() if n in names}


def _gathered(params: list[nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_base(model: nn.Module, output_dir: Path, names: set[str]) -> None:
    """Write randomly initialised tensors (tied copies once) to ``base.safetensors``."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name in names and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(output_dir / "base.safetensors"))


def save_adapter(state: dict[str, torch.Tensor], output_dir: Path, meta: dict) -> None:
    """Write ``adapter/adapter.safetensors`` and ``adapter/adapter_config.json``."""
    folder = output_dir / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter.safetensors"))
    config = {"format_version": FORMAT_VERSION, **meta, "tensors": sorted(state)}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_adapter_config(output_dir: Path) -> dict:
    path = Path(output_dir) / "adapter" / "adapter_config.json"
    return read_versioned_json(path, FORMAT_VERSION, f"{output_dir} is not a finished mmadapt run: {path} is missing")


def read_versioned_json(path: Path, version: int, missing: str) -> dict:
    """The JSON object in ``path``, whose ``format_version`` must be ``version``.

    Raises:
        InputError: ``missing`` when there is no such file; the position when it is not a
            JSON object; the versions when they differ.
    """
    if not path.is_file():
        raise InputError(missing)
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(content).__name__}")
    if content.get("format_version") != version:
        raise InputError(f"{path}: format_version {content.get('format_version')} is not {version}")
    return content


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file into ``model``; every tensor in it must belong to the model."""
    result = model.load_state_dict(load_file(str(path)), strict=False)
    if result.unexpected_keys:
        raise InputError(f"{path} holds tensors this model does not have: {result.unexpected_keys[:3]}")
