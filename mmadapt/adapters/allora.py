"""ALLoRA (arXiv 2410.09692): LoRA without dropout or scale, with gradients rescaled by parameter norm.

Forward and merge are LoRA's with ``s = 1`` (``alpha`` equals ``r``) and no dropout. A
gradient hook rescales each row ``theta_i`` of A and of B on every micro-batch:
``g_i <- g_i / sqrt(||theta_i||^2 + 1 / eta^2)``, computed as
``eta * g_i / sqrt(eta^2 ||theta_i||^2 + 1)`` so that a zero row (B at init) gets
exactly ``eta``; rows far from zero get about ``1 / ||theta_i||``. The parameters do
not change during accumulation, so the edit is linear in the gradient.

The per-row form and ``eta`` are the recommended reading of the paper's "coefficient
inversely proportional to the parameters' l2 norm". Adam-type optimizers divide out a
constant gradient scale, so under AdamW the rescaling acts through its change over time
(and fully under SGD).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from .lora import LoRA, LoRASpec
from .registry import register_adapter


class ALLoRASpec(LoRASpec):
    eta: float = Field(1.0, gt=0.0, description="gradient multiplier of a zero row (B at init); large rows get ~1/norm")

    @field_validator("alpha")
    @classmethod
    def _unit_scale(cls, alpha: float, info: ValidationInfo) -> float:
        if alpha != info.data.get("r"):
            raise ValueError("allora has no scale (delta = B A): leave alpha out or set it to r")
        return alpha

    @field_validator("dropout", "use_rslora")
    @classmethod
    def _off(cls, value: float | bool, info: ValidationInfo) -> float | bool:
        if value:
            raise ValueError(f"allora has no {info.field_name}: leave it out")
        return value

    @model_validator(mode="after")
    def _alpha_is_r(self) -> ALLoRASpec:
        self.alpha = float(self.r)  # LoRA's scale alpha / r is then 1
        return self


@register_adapter("allora")
class ALLoRA(LoRA):
    spec_class = ALLoRASpec
    zero_stages = (0, 1, 2)
    zero_stage_reason = "its gradient hook reads whole parameter rows, which ZeRO-3 partitions across ranks"

    def gradient_hooks(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {"lora_A.weight": self._rescale(self.lora_A.weight), "lora_B.weight": self._rescale(self.lora_B.weight)}

    def _rescale(self, param: nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor]:
        eta = self.spec.eta

        def rescaled(grad: torch.Tensor) -> torch.Tensor:  # (rows, cols)
            sq_norms = param.detach().float().square().sum(dim=1, keepdim=True)  # (rows, 1)
            return grad * (eta / torch.sqrt(eta**2 * sq_norms + 1)).to(grad.dtype)

        return rescaled
