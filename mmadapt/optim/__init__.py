"""Optimizers by name (``train.optimizer``): AdamW, and wrappers for methods that change the update.

A wrapper's factory gets the trainer's parameter groups, the model (to pair a
method's parameters by module, e.g. LoRA-Pro's A and B) and ``train.optimizer_args``;
it returns one ``torch.optim.Optimizer`` whose ``param_groups`` are those groups, so
the LR schedule and DeepSpeed drive it like any other. A wrapper updates the
parameters it owns itself and leaves the rest to an inner AdamW.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InputError

OptimizerFactory = Callable[[list[dict], nn.Module, dict], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerFactory] = {}
ZERO_STAGES: dict[str, tuple[int, ...]] = {}


def register_optimizer(name: str, zero_stages: tuple[int, ...] = (0, 1, 2, 3)):
    """Decorator adding an optimizer factory under ``name``, with the ZeRO stages it supports."""

    def add(factory: OptimizerFactory) -> OptimizerFactory:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is already registered")
        OPTIMIZERS[name] = factory
        ZERO_STAGES[name] = zero_stages
        return factory

    return add


@register_optimizer("adamw")
def adamw(param_groups: list[dict], model: nn.Module, args: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8, **args)


def check_args(name: str, args: dict, optimizer_class: type) -> None:
    """Refuse ``train.optimizer_args`` keys that ``optimizer_class`` does not take
    (its constructor's parameters after ``param_groups`` and ``model``)."""
    accepted = list(inspect.signature(optimizer_class).parameters)[2:]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise InputError(f"train.optimizer_args: {name} takes {', '.join(accepted)}, not {', '.join(unknown)}")


def build_optimizer(name: str, param_groups: list[dict], model: nn.Module, args: dict, zero_stage: int):
    """The optimizer ``train.optimizer`` names, checked against the ZeRO stage."""
    if name not in OPTIMIZERS:
        raise InputError(f"config key 'train.optimizer': unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    if zero_stage not in ZERO_STAGES[name]:
        stages = ", ".join(map(str, ZERO_STAGES[name]))
        raise InputError(
            f"train.optimizer={name} supports deepspeed.zero_stage {stages} only (it pairs whole matrices "
            f"on one rank, which ZeRO {zero_stage} partitions); got {zero_stage}"
        )
    return OPTIMIZERS[name](param_groups, model, args)


from . import flora, lora_pro  # noqa: E402,F401  (each registers its optimizer)
