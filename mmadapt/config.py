"""Typed configuration: YAML recipe + model preset + ``dotted.key=value`` overrides.

A recipe names a model preset (``model: models/tiny.yaml``, relative to the repo
root or to the recipe) and holds everything trained. Overrides are parsed as YAML
values and applied before validation, so a wrong key or type is reported once,
by its dotted name, with the nearest valid key.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .adapters.registry import adapter_class, parse_spec
from .data.config import DataConfig
from .encoders.cformer import CFormerConfig
from .encoders.speech import SpeechConfig
from .encoders.vision import VisionConfig
from .errors import InputError
from .llm import LLMConfig
from .projectors import ProjectorConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
Trainable = Literal["adapters", "projector", "vision", "speech", "llm"]


class ConfigError(InputError):
    """A config key is unknown or holds a wrong value."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SpeechPreset(Strict):
    encoder: SpeechConfig = Field(default_factory=SpeechConfig, description="Whisper-style encoder")
    cformer: CFormerConfig = Field(
        default_factory=CFormerConfig, description="CIF length adapter between the encoder and the projector"
    )


class ModelPreset(Strict):
    llm: LLMConfig
    vision: VisionConfig | None = Field(None, description="image encoder; None for text/speech-only models")
    speech: SpeechPreset | None = Field(None, description="speech encoder + CFormer; None for models without speech")
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig, description="encoder -> LLM width")
    adapters: list[dict] = Field(default_factory=list, description="default adapters of this preset")


class TrainConfig(Strict):
    output_dir: str = Field("runs/default", description="where metrics, checkpoints and the adapter go")
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    seed: int = Field(0, description="seed for weights, data order and dropout")
    batch_size: int = Field(8, gt=0, description="micro-batch per rank")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    lr_scale: dict[Trainable, float] = Field(default_factory=dict, description="per-group lr multipliers")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only)")
    optimizer: str = Field(
        "adamw", description="adamw, or a method's optimizer (flora_opt; lora_pro, which lora_pro adapters select)"
    )
    optimizer_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the optimizer")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * this")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 disables")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 where supported (GPU)")
    trainable: list[Trainable] = Field(["adapters", "projector"], description="which parts train")
    gradient_checkpointing: bool = Field(False, description="recompute LLM layers in backward")
    align_steps: int = Field(
        0, ge=0, description="first steps use the cheap alignment loss (no LLM pass) to warm up encoders "
        "trained from scratch; the LM (or BLSP-KD) loss follows. Speech always uses the readout",
    )
    align_loss: Literal["readout", "contrastive"] = Field(
        "readout", description="image alignment: readout (image token i read as answer token i through the "
        "LLM's embedding table) or contrastive (mean image token vs mean answer embedding across the batch)",
    )
    readout_negatives: int | None = Field(
        None, gt=0, description="readout alignment: softmax over the targets' rows plus this many rows drawn "
        "uniformly from the embedding table (sampled softmax, much cheaper); null: the whole table",
    )
    save_every: int = Field(0, ge=0, description="checkpoint every N steps; 0: only at the end")
    keep_last: int = Field(2, gt=0, description="complete checkpoints kept")
    log_every: int = Field(1, gt=0, description="metrics.jsonl row every N steps")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps; 0: only at the end")
    resume: str = Field("none", description="auto (newest complete checkpoint), a checkpoint path, or none")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per rank; default: cores / ranks")

    @field_validator("trainable")
    @classmethod
    def _non_empty(cls, trainable: list[str]) -> list[str]:
        if not trainable:
            raise ValueError("at least one part must train")
        return trainable


class EvalConfig(Strict):
    metric: str = Field("shapes", description="task metric on generated answers: shapes | exact")
    max_new_tokens: int = Field(24, gt=0, description="generation length for the task metric")
    batch_size: int = Field(16, gt=0, description="eval batch per rank")


class LossConfig(Strict):
    type: Literal["sft", "blsp_kd"] = Field(
        "sft", description="sft: cross-entropy on assistant text; blsp_kd: speech-to-text distillation"
    )
    temperature: float = Field(2.0, gt=0, description="blsp_kd: softmax temperature of both KL terms")
    kd: float = Field(1.0, ge=0, description="blsp_kd: weight of KL(teacher || student) on the continuation")
    input_kl: float = Field(
        1.0, ge=0, description="blsp_kd: weight of the KL pairing CIF token i with transcript token i"
    )
    quantity: float = Field(1.0, ge=0, description="blsp_kd: weight of the CIF quantity loss |Σα − N| / N")


class DeepSpeedConfig(Strict):
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage 0-3")
    offload_optimizer: bool = Field(False, description="optimizer state on CPU (DeepSpeedCPUAdam)")
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the DeepSpeed config")


class Config(Strict):
    preset: str = Field(description="model preset file the model came from")
    model: ModelPreset
    adapters: list[dict] = Field(default_factory=list, description="adapter entries; default: the preset's")
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    @model_validator(mode="after")
    def _adapters_valid(self) -> Config:
        for index, entry in enumerate(self.adapters):
            try:
                parse_spec(entry)
            except ValidationError as error:
                spec_class = adapter_class(entry["type"]).spec_class
                raise ValueError(_describe(error, prefix=f"adapters.{index}", model=spec_class)) from None
            except ValueError as error:
                raise ValueError(f"config key 'adapters.{index}.type': {error}") from None
            if adapter_class(entry["type"]).per_example:
                raise ValueError(
                    f"config key 'adapters.{index}.type': {entry['type']} picks an adapter per example, which "
                    "the trainer does not set; use mmadapt.adapters.example_adapters() in your own loop"
                )
        if self.train.align_steps >= self.train.max_steps:
            raise ValueError(
                f"config key 'train.align_steps': {self.train.align_steps} leaves no LM step "
                f"before train.max_steps={self.train.max_steps}"
            )
        if self.train.align_steps and self.model.vision is None and self.model.speech is None:
            raise ValueError("config key 'train.align_steps': the alignment stage needs a vision or speech encoder")
        for part in ("vision", "speech"):
            if part in self.train.trainable and getattr(self.model, part) is None:
                raise ValueError(f"train.trainable lists {part} but the model has no {part} encoder")
        if self.loss.type == "blsp_kd" and self.model.speech is None:
            raise ValueError("config key 'loss.type': blsp_kd needs a model with a speech encoder (model.speech)")
        return self


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a recipe, resolve its model preset, apply overrides and validate.

    Args:
        path: recipe YAML (``configs/xcomposer.yaml``) or a saved ``OUT/config.yaml``.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML.

    Raises:
        ConfigError: unreadable file, unknown key or wrong value, naming the key.
    """
    path = Path(path)
    raw = _read_yaml(path, "config file")
    model_overrides = [o for o in overrides or [] if o.split("=", 1)[0] == "model"]
    for override in model_overrides:
        _apply_override(raw, override)
    raw["model"], raw["preset"] = _resolve_preset(raw.get("model"), raw.get("preset"), path)
    if "adapters" not in raw and isinstance(raw["model"], dict):
        raw["adapters"] = list(raw["model"].get("adapters", []))
    for override in overrides or []:
        if override not in model_overrides:
            _apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, prefix="", model=Config)) from None


def load_preset(name: str) -> ModelPreset:
    """Read and validate a model preset on its own (``models/tiny.yaml``), found under the
    repo root or as given.

    Raises:
        ConfigError: the file is missing or unreadable, or a key is unknown or wrong.
    """
    candidates = [path for path in (REPO_ROOT / name, Path(name)) if path.is_file()]
    if not candidates:
        raise ConfigError(f"model preset {name!r} not found under {REPO_ROOT} or the current folder")
    raw = _read_yaml(candidates[0], "model preset")
    try:
        return ModelPreset.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"model preset {name}: {_describe(error, prefix='', model=ModelPreset)}") from None


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (preset inlined) so a run can be rebuilt from it."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _resolve_preset(model: Any, preset: str | None, recipe: Path) -> tuple[dict, str]:
    if isinstance(model, dict):
        return model, preset or str(recipe)
    if not isinstance(model, str):
        raise ConfigError(f"{recipe}: key 'model' must name a preset file such as models/tiny.yaml")
    for candidate in (REPO_ROOT / model, recipe.parent / model, Path(model)):
        if candidate.is_file():
            return _read_yaml(candidate, "model preset"), model
    raise ConfigError(f"model preset {model!r} (key 'model') not found under {REPO_ROOT} or {recipe.parent}")


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like dotted.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML: {error}") from None
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]))
    _set(node, parts[-1], value, key)


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {where}: {where.rsplit('.', 1)[0]} is not a mapping")
    return node.setdefault(part, {})


def _set(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        node[_list_index(node, part, key)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"override {key}: parent is not a mapping")


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {where}: list index must be 0..{len(node) - 1}")
    return int(part)


def _describe(error: ValidationError, prefix: str, model: type[BaseModel] | None) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(filter(None, [prefix, *loc]))
    if first["type"] == "extra_forbidden":
        nearest = _nearest_key(model, loc) if model else None
        hint = ".".join(filter(None, [prefix, nearest])) if nearest else None
        return f"unknown config key {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
    if first["type"] == "missing":
        return f"config key {key!r} is required"
    message = first["msg"].removeprefix("Value error, ")
    if not loc:
        return message
    return f"config key {key!r}: {message} (got {first.get('input')!r})"


def _nearest_key(model: type[BaseModel], loc: list[str]) -> str | None:
    fields = _fields_at(model, loc[:-1])
    nearest = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.4)
    return ".".join([*loc[:-1], nearest[0]]) if nearest else None


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            return []
        inner = [a for a in typing.get_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = inner[0] if inner else field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def reference() -> str:
    """Every config key with its default and help, for ``mmadapt config --reference``."""
    lines: list[str] = []
    _reference_lines(Config, "", lines)
    return "\n".join(lines)


def _reference_lines(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = [a for a in (field.annotation, *typing.get_args(field.annotation)) if _is_model(a)]
        if nested:
            lines.append(f"{key}:  {field.description or ''}".rstrip())
            _reference_lines(nested[0], key + ".", lines)
            continue
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        lines.append(f"{key} = {default}  # {field.description or ''}".rstrip(" #"))


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
