"""LoRA-SP (arXiv 2403.08822): LoRA whose entries are half frozen by a fixed random mask.

Forward and merge are LoRA's. A seeded element-wise mask per factor, drawn once and
saved with the adapter, picks ``keep`` of the entries of A and of B to train; a
gradient hook zeroes the others' gradients on every micro-batch, and after each
optimizer step the frozen entries are written back to their initial values, so
weight decay cannot move them either. Frozen entries of B stay zero, so B is
sparse. The masks are dense: they save no memory here (the paper's savings need
sparse gradient and optimizer storage).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..hooks import StepContext
from .lora import LoRA, LoRASpec
from .registry import register_adapter


class LoRASPSpec(LoRASpec):
    keep: float = Field(0.5, gt=0.0, le=1.0, description="fraction of each factor's entries that train")


@register_adapter("lora_sp")
class LoRASP(LoRA):
    spec_class = LoRASPSpec
    zero_stages = (0, 1, 2)
    zero_stage_reason = "it restores frozen entries after each step through the optimizer's full master copy"

    def __init__(self, base: nn.Module, spec: LoRASPSpec) -> None:
        super().__init__(base, spec)
        self.register_buffer("mask_A", _half_mask(self.lora_A.weight, spec.keep))
        self.register_buffer("mask_B", _half_mask(self.lora_B.weight, spec.keep))
        self.register_buffer("initial_A", self.lora_A.weight.detach().clone())

    def gradient_hooks(self):
        return {"lora_A.weight": lambda grad: grad * self.mask_A, "lora_B.weight": lambda grad: grad * self.mask_B}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        a, b = self.lora_A.weight, self.lora_B.weight
        ctx.write(a, torch.where(self.mask_A.bool(), ctx.read(a), self.initial_A))
        ctx.write(b, ctx.read(b) * self.mask_B)


def _half_mask(weight: torch.Tensor, keep: float) -> torch.Tensor:
    """Exactly ``floor(keep * numel)`` ones at random places (the global seeded RNG, so every rank agrees)."""
    flat = torch.zeros(weight.numel(), dtype=weight.dtype)
    flat[torch.randperm(weight.numel())[: int(keep * weight.numel())]] = 1
    return flat.view_as(weight)
