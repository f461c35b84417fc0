"""FLoRA (Si et al. 2024, arXiv 2405.14739): a Tucker-decomposed delta for N-dim weights.

``delta_W = s * G x_1 U_1 x_2 U_2 ... x_N U_N`` with a core ``G`` of shape
``(r_1, ..., r_N)`` and one factor ``U_i`` of shape ``(d_i, r_i)`` per weight mode,
modes ordered ``[in, out, k_1, ...]`` as in the official code, the result then
transposed to PyTorch's ``(out, in, k_1, ...)`` layout. For a linear layer (N = 2)
this is LoRA with a trainable ``r_in x r_out`` core between its two factors; for a
conv layer the kernel's spatial modes keep their own factors instead of being
flattened into a matrix.

G starts at zero and the factors Kaiming-normal (a = sqrt(3)), so the adapted layer
equals the base layer until training moves G. The official code sizes the input
factor with ``in_channels``, which breaks grouped and depthwise convs; here every
mode is read off the base weight's shape, so ``d_in = in_channels // groups``.

A linear adapter computes its delta on the selected rows without forming delta_W
(``x U_in G U_out^T s``); a conv adapter (``forward_full``) convolves the whole input
with delta_W using the base conv's own stride, padding, padding mode, dilation and groups.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from ..errors import InputError
from .base import CONV_LAYERS, Adapter, AdapterSpec
from .registry import register_adapter


class FloraTuckerSpec(AdapterSpec):
    ranks: list[PositiveInt] | None = Field(
        None,
        description="Tucker rank per weight mode, ordered [in, out, k_1, ...]; "
        "default [r, r] for a linear layer, [r, r, min(r, k_1), ...] for a conv",
    )
    scale: float = Field(
        1.0, description="s, the delta's multiplier (the official code's default; its conv example uses 4.0)"
    )

    @model_validator(mode="after")
    def _scale_not_alpha(self) -> FloraTuckerSpec:
        if "alpha" in self.model_fields_set:
            raise ValueError("flora_tucker scales its delta by 'scale', not 'alpha'; set scale instead")
        return self


@register_adapter("flora_tucker")
class FloraTucker(Adapter):
    spec_class = FloraTuckerSpec

    def __init__(self, base: nn.Module, spec: FloraTuckerSpec) -> None:
        super().__init__(base, spec)
        if not isinstance(base, (nn.Linear, *CONV_LAYERS)):
            raise InputError(f"flora_tucker adapts nn.Linear and nn.Conv1d/2d/3d layers, not {type(base).__name__}")
        out_dim, in_dim, *kernel = base.weight.shape  # in_dim = in_channels // groups for a conv
        dims = [in_dim, out_dim, *kernel]
        ranks = spec.ranks or [spec.r, spec.r, *(min(spec.r, k) for k in kernel)]
        if len(ranks) != len(dims):
            raise InputError(
                f"flora_tucker on {type(base).__name__} with weight shape {tuple(base.weight.shape)}: "
                f"ranks has {len(ranks)} entries but the weight has {len(dims)} modes {dims} "
                "(ordered [in, out, kernel...])"
            )
        dtype = base.weight.dtype
        self.core = nn.Parameter(torch.empty(ranks, dtype=dtype))  # (r_in, r_out, r_k1, ...)
        self.factors = nn.ParameterList(torch.empty(d, r, dtype=dtype) for d, r in zip(dims, ranks))  # (d_i, r_i)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.scale = spec.scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.core)
        for factor in self.factors:
            nn.init.kaiming_normal_(factor, a=math.sqrt(3))

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # linear layers: (N, in) -> (N, out)
        x_rows = self.dropout(x_rows)
        u_in, u_out = self.factors
        if self._factored_is_cheaper(x_rows.shape[0]):
            return x_rows @ u_in @ (self.core * self.scale) @ u_out.T  # scale the tiny core, not the rows
        return x_rows @ self.delta_weight().T

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:  # conv: (B, C_in, *spatial) -> (B, C_out, *spatial')
        """The conv delta on the whole input: the base conv's own op with delta_W and no bias."""
        # _conv_forward is the exact op the base layer runs (stride, padding and padding_mode,
        # dilation, groups), so conv(x, W0) + this == conv(x, W0 + delta_W).
        return self.base_layer._conv_forward(self.dropout(x), self.delta_weight().to(x.dtype), None)

    def delta_weight(self) -> torch.Tensor:
        """``s * G x_1 U_1 ... x_N U_N`` in the base weight's layout ``(out, in / groups, *kernel)``."""
        delta = self.core * self.scale  # scaled while it is the smallest tensor of the chain
        for factor in self.factors:
            # Contract the core's leading mode; the factor's full dimension goes to the back,
            # so after N steps the modes read (in, out, k_1, ...).
            delta = torch.tensordot(delta, factor, dims=([0], [1]))
        return delta.transpose(0, 1)

    def _factored_is_cheaper(self, n_rows: int) -> bool:
        """Multiply-adds of the three-factor row path vs forming delta_W and one dense matmul."""
        (d_in, r_in), (d_out, r_out) = (f.shape for f in self.factors)
        factored = n_rows * (d_in * r_in + r_in * r_out + r_out * d_out)
        dense = d_in * r_in * r_out + d_in * r_out * d_out + n_rows * d_in * d_out
        return factored <= dense
