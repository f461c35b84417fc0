"""Partial LoRA (InternLM-XComposer2): LoRA that fires only on modality tokens.

``delta = (alpha / r) * B(A(dropout(x)))`` on the selected rows. B starts at zero,
so the adapted model equals the base model until training moves it. (XComposer2's
released code means to zero B as well, but its init never runs.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, AdapterSpec
from .registry import register_adapter


@register_adapter("plora")
class PLoRA(Adapter):
    def __init__(self, base: nn.Module, spec: AdapterSpec) -> None:
        super().__init__(base, spec)
        out_features, in_features = base.weight.shape
        self.lora_A = nn.Linear(in_features, spec.r, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(spec.r, out_features, bias=False, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.scaling = spec.alpha / spec.r
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        return self.lora_B(self.lora_A(self.dropout(x_rows))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight * self.scaling
