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
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..modality import MODALITIES, ModalityContext

if TYPE_CHECKING:
    from ..hooks import StepContext

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    """Base class: subclasses build parameters in ``__init__`` and define ``forward(x_rows)``.

    Class attributes a variant may set:

    - ``spec_class``: its config model (an :class:`AdapterSpec` subclass).
    - ``exclusive``: it reparametrises the whole weight of its rows (DoRA's
      normalisation), so no other adapter may fire on the same rows of the layer.
    - ``per_example``: ``forward`` also takes ``examples`` (LongTensor[N], the example
      index of each row, as set by :func:`mmadapt.adapters.example_adapters`).

    - ``zero_stages``: the DeepSpeed ZeRO stages its training hooks work under; the
      trainer refuses the others, giving ``zero_stage_reason``.
    - ``optimizer``: the optimizer wrapper (``mmadapt.optim``) its parameters need.

    A mergeable variant defines :meth:`delta_weight`; one whose merged weight is not
    ``W0 + delta`` overrides :meth:`merge` and :meth:`unmerge` as well. A variant that
    also adapts conv layers (``CONV_LAYERS``) defines :meth:`forward_full`.

    A variant that acts through the training loop overrides the training hooks
    (:meth:`gradient_hooks`, :meth:`extra_loss`, :meth:`before_step`,
    :meth:`after_step`, :meth:`stage_steps`, :meth:`data_splits`); the trainer calls
    them through :class:`mmadapt.hooks.TrainingHooks`. State they keep across steps
    lives in buffers, so checkpoints, resume and the exported adapter carry it.
    """

    spec_class: ClassVar[type[AdapterSpec]] = AdapterSpec
    exclusive: ClassVar[bool] = False
    per_example: ClassVar[bool] = False
    zero_stages: ClassVar[tuple[int, ...]] = (0, 1, 2, 3)
    zero_stage_reason: ClassVar[str] = ""
    optimizer: ClassVar[str | None] = None

    def __init__(self, base: nn.Module, spec: AdapterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.modalities = frozenset(MODALITIES[m] for m in spec.modalities)
        self.merged = False
        # A plain attribute, not a submodule: the base layer's weights stay out of the adapter's state dict.
        object.__setattr__(self, "base_layer", base)

    @abc.abstractmethod
    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        """The delta on the selected rows only."""

    @classmethod
    def layer_spec(cls, spec: AdapterSpec, name: str, names: list[str]) -> AdapterSpec:
        """The spec of the copy placed in module ``name``, one of the ``names`` its entry
        matched. A variant whose shape depends on the layer's place (PRILoRA's rank
        rising with depth) overrides this; the default is the entry's spec."""
        return spec

    @classmethod
    def adapts_conv(cls) -> bool:
        return cls.forward_full is not Adapter.forward_full

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, *spatial) -> (B, C_out, *spatial')
        """Conv layers: the delta on the whole input, whose rows carry no token modality."""
        raise NotImplementedError(f"{self.spec.type} does not adapt conv layers")

    @property
    def mergeable(self) -> bool:
        return type(self).delta_weight is not Adapter.delta_weight

    def delta_weight(self) -> torch.Tensor:
        """The change this adapter makes to the base weight (same shape), if it has one."""
        raise NotImplementedError(f"{self.spec.type} has no exact merged form")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; it stops adding its delta."""
        self._check_merged(False)
        weight = self.base_layer.weight
        weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base weight."""
        self._check_merged(True)
        weight = self.base_layer.weight
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    # ---- training hooks (no-ops unless a variant overrides them) ------------------------
    def gradient_hooks(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Edits of this adapter's gradients by parameter name, run on each micro-batch's
        gradient before it is accumulated or reduced across ranks (so under every ZeRO
        stage). An edit must be linear in the gradient, so editing micro-batches equals
        editing their sum."""
        return {}

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        """A regulariser added to each micro-batch's loss (its gradient then carries it)."""
        return None

    def before_step(self, ctx: StepContext) -> None:
        """Called once per optimizer step, after the last backward, before the update."""

    def after_step(self, ctx: StepContext) -> None:
        """Called once per optimizer step after the update; write parameters through ``ctx``."""

    def stage_steps(self) -> int | None:
        """Length of this method's training stages: the trainer calls :meth:`end_stage`
        every that many steps (and restarts the LR schedule there when
        :meth:`restarts_lr` says so)."""
        return None

    def restarts_lr(self) -> bool:
        return False

    def end_stage(self, ctx: StepContext) -> None:
        """Called after the update of a step that ends a stage (see :meth:`stage_steps`)."""

    def data_splits(self) -> dict[str, float] | None:
        """Disjoint training-data splits by name and fraction (bi-level methods); the
        trainer then draws each step's batches from the split :meth:`split_for_step` names."""
        return None

    def split_for_step(self, step: int) -> str:
        raise NotImplementedError(f"{self.spec.type} declares no data splits")

    def _check_merged(self, expected: bool) -> None:
        if self.merged != expected:
            raise RuntimeError(f"{self.spec.type} adapter is {'already' if self.merged else 'not'} merged")


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
            rows = None if adapter.merged else self.context.rows(adapter.modalities, x)
            if rows is None:
                continue
            changed = True
            every_row = rows.numel() == x_flat.shape[0]  # sorted and unique: skip gather/scatter
            x_rows = x_flat if every_row else x_flat.index_select(0, rows)
            extra = (self.context.row_examples(rows, x),) if adapter.per_example else ()
            delta = adapter(x_rows, *extra).to(y_flat.dtype)  # (N_rows, out)
            y_flat = y_flat + delta if every_row else y_flat.index_add(0, rows, delta)
        return y_flat.view_as(y) if changed else y

    def add_full_deltas(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A conv layer belongs to one encoder, so one modality: its adapters see the whole input."""
        if self.context.state.disabled:
            return y
        for adapter in self.values():
            if not adapter.merged:
                y = y + adapter.forward_full(x).to(y.dtype)
        return y


def apply_stack_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return module.mmadapt.add_deltas(args[0], output)
    return module.mmadapt.add_full_deltas(args[0], output)
