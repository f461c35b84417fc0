"""fLoRA (Wen & Chaudhuri 2023, arXiv 2312.05677): a different adapter per example, one pass.

The layer holds K adapters; :func:`mmadapt.adapters.example_adapters` says which one
each example of the batch uses, and every row is adapted by its example's adapter in
one vectorised pass, so a batch mixing tasks (or users) trains and serves as one batch
instead of one model pass per adapter.

- ``multiplicative`` (the paper's form, residual so that B = 0 is the base model):
  ``delta_W_k = s * W0 ⊙ (B_k A_k)``, computed without forming delta_W as
  ``delta_y = s * sum_j B_k[:, j] ⊙ ((x ⊙ A_k[j]) W0^T)``: r extra base-size matmuls,
  which is why the paper keeps r small.
- ``additive``: batched LoRA, ``delta_W_k = s * B_k A_k``.

``s = alpha / r`` in both modes. A_k starts random (LoRA's Kaiming-uniform), B_k at
zero, so every adapter starts at the base model. There is no merged form: merging one
adapter would apply it to every example; :meth:`FloraBatched.delta_weight_of` gives
adapter k's delta for serving it alone.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from ..errors import InputError
from .base import Adapter, AdapterSpec
from .registry import register_adapter


class FloraBatchedSpec(AdapterSpec):
    num_adapters: PositiveInt = Field(description="K, the number of adapters an example can pick from")
    mode: Literal["multiplicative", "additive"] = Field(
        "multiplicative", description="multiplicative: delta_W = W0 ⊙ (B A) (the paper); additive: B A (LoRA)"
    )


@register_adapter("flora_batched")
class FloraBatched(Adapter):
    spec_class = FloraBatchedSpec
    per_example = True

    def __init__(self, base: nn.Module, spec: FloraBatchedSpec) -> None:
        super().__init__(base, spec)
        if not isinstance(base, nn.Linear):
            raise InputError(f"flora_batched adapts nn.Linear layers only, not {type(base).__name__}")
        out_features, in_features = base.weight.shape
        dtype = base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(spec.num_adapters, spec.r, in_features, dtype=dtype))  # (K, r, in)
        self.lora_B = nn.Parameter(torch.empty(spec.num_adapters, out_features, spec.r, dtype=dtype))  # (K, out, r)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.scaling = spec.alpha / spec.r
        self.multiplicative = spec.mode == "multiplicative"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming-uniform (a = sqrt(5)) of each adapter's own (r, in) matrix, as LoRA draws A.
        bound = 1 / math.sqrt(self.lora_A.shape[-1])
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def forward(self, x_rows: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:  # (N, in), (N,) -> (N, out)
        x_rows = self.dropout(x_rows)
        a_rows = (self.lora_A * self.scaling)[examples]  # (N, r, in); scaling the K adapters costs least
        b_rows = self.lora_B[examples]  # (N, out, r)
        if self.multiplicative:
            # All r modulated inputs go through W0 as one (N * r, in) matmul.
            through_w0 = nn.functional.linear(x_rows.unsqueeze(1) * a_rows, self.base_layer.weight)  # (N, r, out)
            return torch.einsum("nro,nor->no", through_w0, b_rows)
        down = torch.einsum("ni,nri->nr", x_rows, a_rows)  # (N, r)
        return torch.einsum("nr,nor->no", down, b_rows)

    def delta_weight_of(self, k: int) -> torch.Tensor:
        """Adapter ``k``'s change to the base weight (out, in): what merging it alone would add."""
        low_rank = self.lora_B[k] @ self.lora_A[k] * self.scaling  # (out, in)
        return self.base_layer.weight * low_rank if self.multiplicative else low_rank
