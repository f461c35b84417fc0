"""LoRA (Hu et al. 2021): a scaled low-rank delta ``s * B A`` on the adapter's rows.

``delta = s * B(A(dropout(x)))`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).
A starts Kaiming-uniform and B at zero, as in PEFT, so the adapted model equals the
base model until training moves B. Like every mmadapt adapter it fires only on the
rows of its modalities; ``plora`` (XComposer2's Partial LoRA) is this class under
the name that paper gives it.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from .base import Adapter, AdapterSpec
from .registry import register_adapter


class LoRASpec(AdapterSpec):
    use_rslora: bool = Field(False, description="rank-stabilised scale alpha / sqrt(r) instead of alpha / r")


@register_adapter("lora")
class LoRA(Adapter):
    spec_class = LoRASpec

    def __init__(self, base: nn.Module, spec: LoRASpec) -> None:
        super().__init__(base, spec)
        out_features, in_features = base.weight.shape
        self.lora_A = nn.Linear(in_features, spec.r, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(spec.r, out_features, bias=False, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.scaling = spec.alpha / (math.sqrt(spec.r) if spec.use_rslora else spec.r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        return self.lora_B(self.lora_A(self.dropout(x_rows))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight * self.scaling  # (out, in)
