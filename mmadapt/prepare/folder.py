"""The prepared-model folder: a base LLM whose linear layers no longer fit its HF config.

A folder written by ``mmadapt prune`` or ``mmadapt decompose`` holds::

    config.json, generation_config.json   the original model's HF config, unchanged
    tokenizer files                         the original tokenizer
    model.safetensors                       every weight of the prepared model (fp32)
    prepared.json                           format version, method, settings, parameter counts,
                                            perplexities, and "modules": the changed modules
    preset.yaml                             the source preset with llm: {source: prepared, path: <folder>}

``"modules"`` maps each changed module's full name to its shape, e.g.
``{"type": "linear", "in_features": 576, "out_features": 384, "bias": false}`` (a pruned
layer) or ``{"type": "low_rank", ..., "rank": 96}`` (a LoRD layer). The loader builds the
HF model from the config, swaps these modules in, then loads the weights strictly, so a
missing or surplus tensor is an error rather than a silently random weight.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from ..errors import InputError
from ..export import read_versioned_json
from .lord import LowRankLinear

FORMAT_VERSION = 1
META_FILE = "prepared.json"
WEIGHTS_FILE = "model.safetensors"


def module_spec(module: nn.Linear) -> dict:
    """The JSON description of a changed linear module."""
    spec = {
        "type": "low_rank" if isinstance(module, LowRankLinear) else "linear",
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
    }
    if isinstance(module, LowRankLinear):
        spec["rank"] = module.rank
    return spec


def build_module(spec: dict) -> nn.Linear:
    """An empty module of the shape ``spec`` describes (weights are loaded afterwards)."""
    if spec["type"] == "low_rank":
        return LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])
    return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])


def write_folder(
    out: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    meta: dict,
    extra_files: Callable[[Path], None],
) -> None:
    """Write a prepared folder at ``out`` (which must not exist), all or nothing.

    Args:
        meta: ``prepared.json``'s content; ``modules`` must name every changed module.
        extra_files: writes further files into the staging folder (the preset).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.config.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / WEIGHTS_FILE))  # keeps one copy of tied weights
        (staging / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2) + "\n")
        extra_files(staging)
        staging.chmod(0o755)  # mkdtemp makes it owner-only
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_meta(folder: Path) -> dict:
    """``prepared.json`` of ``folder``, checked for its format version.

    Raises:
        InputError: the folder is not a prepared-model folder of this version.
    """
    missing = f"llm.path: {folder} is not a prepared model folder ({META_FILE} is missing)"
    return read_versioned_json(Path(folder) / META_FILE, FORMAT_VERSION, missing)


def load_prepared(folder: Path, attn_implementation: str = "eager", trust_remote_code: bool = False) -> PreTrainedModel:
    """Rebuild the prepared model in ``folder`` in fp32.

    Raises:
        InputError: not a prepared folder, or its weights do not fit the described modules.
    """
    meta = read_meta(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    with no_init_weights():  # every weight is loaded below, strictly
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    model.tie_weights()  # skipped with the initialisation; the file holds one copy of tied weights
    for name, spec in meta["modules"].items():
        model.set_submodule(name, build_module(spec))
    missing, unexpected = load_model(model, str(Path(folder) / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise InputError(
            f"{folder}/{WEIGHTS_FILE} does not fit {META_FILE}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model
