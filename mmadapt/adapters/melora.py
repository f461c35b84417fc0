"""MELoRA (arXiv 2402.17263): n mini LoRAs side by side on a block-diagonal weight.

The input row is cut into n equal chunks along ``in`` and the delta into n equal
chunks along ``out``; mini adapter k maps chunk k to chunk k:
``delta_k = (alpha / r) * B_k A_k dropout(x_k)``. So
``delta_weight = blockdiag(s B_1 A_1, ..., s B_n A_n)`` has rank up to ``n * r`` at the
parameter cost of one LoRA of rank ``r``. Here ``r`` is the rank of *each* mini
adapter and the scale is ``alpha / r`` per mini adapter, as in the official code;
that makes the scale large for small ``r``, so tune ``alpha`` with this convention.
B starts at zero, so the adapted model equals the base model at init.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..errors import InputError
from .base import Adapter, AdapterSpec
from .registry import register_adapter


class MELoRASpec(AdapterSpec):
    r: int = Field(8, gt=0, description="rank of each mini adapter (r_k); the merged delta has rank up to n * r")
    alpha: float = Field(16.0, description="scale numerator: each mini adapter's delta is multiplied by alpha / r")
    n: int = Field(8, gt=0, description="number of mini adapters; must divide both in and out of every target")


@register_adapter("melora")
class MELoRA(Adapter):
    spec_class = MELoRASpec

    def __init__(self, base: nn.Module, spec: MELoRASpec) -> None:
        super().__init__(base, spec)
        out_features, in_features = base.weight.shape
        if in_features % spec.n or out_features % spec.n:
            raise InputError(
                f"melora: n={spec.n} must divide both sides of a layer of shape (out={out_features}, "
                f"in={in_features}); choose an n that divides both, or leave this layer out of targets"
            )
        n, dtype = spec.n, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(n, spec.r, in_features // n, dtype=dtype))  # (n, r, in/n)
        self.lora_B = nn.Parameter(torch.empty(n, out_features // n, spec.r, dtype=dtype))  # (n, out/n, r)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.scaling = spec.alpha / spec.r
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each A_k is initialised like its own nn.Linear(in/n, r) (fan_in = in/n), as in LoRA.
        for block in self.lora_A:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        n, _, chunk = self.lora_A.shape
        x_chunks = self.dropout(x_rows).reshape(-1, n, chunk)  # (N, n, in/n)
        hidden = torch.einsum("bki,kri->bkr", x_chunks, self.lora_A)  # (N, n, r)
        delta = torch.einsum("bkr,kor->bko", hidden, self.lora_B)  # (N, n, out/n)
        return delta.reshape(x_rows.shape[0], -1) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        blocks = torch.bmm(self.lora_B, self.lora_A) * self.scaling  # (n, out/n, in/n)
        return torch.block_diag(*blocks)
