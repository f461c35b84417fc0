"""The adapter contract: a module that adds a delta on the rows of its modalities.

An adapter never replaces the layer it adapts. It lives in the layer's
``mmadapt`` :class:`AdapterStack`, which a forward hook on the layer runs after the
base computation, so the base model's parameter names, state dict and code stay
untouched. Each adapter computes its low-rank path only on the selected rows
(gather -> delta -> scatter-add), so its cost scales with the number of modality
tokens, and a sequence without such tokens returns the base output bit for bit.
"""

from __future__ import annotations

import abc

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..modality import MODALITIES, ModalityContext


class AdapterSpec(BaseModel):
    """Fields every adapter entry of the config has; variants subclass it."""

    model_config = ConfigDict(extra="forbid")

    type: str
    name: str | None = Field(None, description="key in the state dict; defaults to the type, numbered on repeats")
    modalities: list[str] = Field(["image"], description="token modalities the adapter fires on")
    targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module-name suffixes, or 're:<regex>' on the full name",
    )
    r: int = Field(8, gt=0, description="rank")
    alpha: float = Field(16.0, description="scale numerator: delta is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input rows")

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, modalities: list[str]) -> list[str]:
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {sorted(MODALITIES)}, got {modalities}")
        return modalities


class Adapter(nn.Module, abc.ABC):
    """Base class: subclasses build parameters in ``__init__`` and define ``forward(x_rows)``."""

    spec_class: ClassVar[type[AdapterSpec]] = AdapterSpec

    def __init__(self, base: nn.Module, spec: AdapterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.modalities = frozenset(MODALITIES[m] for m in spec.modalities)

    @abc.abstractmethod
    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        """The delta on the selected rows only."""


class AdapterStack(nn.ModuleDict):
    """The adapters of one layer, applied in order on top of the base output."""

    def __init__(self, context: ModalityContext) -> None:
        super().__init__()
        object.__setattr__(self, "context", context)

    def add_deltas(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_flat = x.reshape(-1, x.shape[-1])  # (N, in)
        y_flat = y.reshape(-1, y.shape[-1])  # (N, out)
        changed = False
        for adapter in self.values():
            rows = self.context.rows(adapter.modalities, x)
            if rows is None:
                continue
            changed = True
            if rows.numel() == x_flat.shape[0]:  # every row (sorted, unique): skip gather/scatter
                y_flat = y_flat + adapter(x_flat).to(y_flat.dtype)
            else:
                delta = adapter(x_flat.index_select(0, rows))  # (N_rows, out)
                y_flat = y_flat.index_add(0, rows, delta.to(y_flat.dtype))
        return y_flat.view_as(y) if changed else y


def apply_stack_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.mmadapt.add_deltas(args[0], output)
