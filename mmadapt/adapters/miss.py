"""MiSS, formerly Bone (Kang & Yin, arXiv 2409.15371): one small block shared by every shard.

Matches PEFT's ``MissLayer`` (``MissConfig.init_weights``) in three variants:

- ``balance`` (PEFT ``True``): ``D`` is (r, out); ``delta = (sum_k x[:, k*r:(k+1)*r]) D``
  with x zero-padded to a multiple of r, i.e. ``dW[o, j] = D[j mod r, o]``.
- ``mini``: ``D`` is (r, mini_r), repeated out / mini_r times along the output axis.
- ``bat``: ``D`` is (out/r, r, r); each r x r block ``W_ij`` of W0 gets
  ``dW_ij = W_ij D_i + D_i``, so the delta depends on W0 and is materialised each step
  (PEFT applies no dropout here, so neither does this).

``D`` starts at zero, so every variant starts at the base model. ``alpha`` is unused
(MiSS has no scale).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..errors import InputError
from .base import Adapter, AdapterSpec
from .registry import register_adapter

# Unmerging bat solves W0 (I + D_i) = W' - D_i; its error grows like cond(I + D_i) * eps,
# so past this condition number the restored W0 would be off by more than ~1e-3 relative in fp32.
MAX_UNMERGE_CONDITION = 1e4


class MiSSSpec(AdapterSpec):
    variant: Literal["balance", "bat", "mini"] = Field("balance", description="MiSS variant (PEFT init_weights)")
    mini_r: int = Field(1, gt=0, description="mini only: output width of the shared block, tiled out/mini_r times")

    @model_validator(mode="after")
    def _bat_has_no_dropout(self) -> MiSSSpec:
        if self.variant == "bat" and self.dropout:
            raise ValueError("miss variant 'bat' materialises W0 + dW and has no dropout; set dropout: 0")
        return self


@register_adapter("miss", "bone")
class MiSS(Adapter):
    spec_class = MiSSSpec

    def __init__(self, base: nn.Module, spec: MiSSSpec) -> None:
        super().__init__(base, spec)
        out_features, in_features = base.weight.shape
        _check_shape(spec, out_features, in_features)
        shape = {
            "balance": (spec.r, out_features),
            "mini": (spec.r, spec.mini_r),
            "bat": (out_features // spec.r, spec.r, spec.r),
        }[spec.variant]
        self.miss_block = nn.Parameter(torch.zeros(shape, dtype=base.weight.dtype))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()

    def shared_block(self) -> torch.Tensor:
        """``D`` of balance, or mini's block tiled to (r, out)."""
        if self.spec.variant == "mini":
            return self.miss_block.repeat(1, self.base_layer.weight.shape[0] // self.spec.mini_r)
        return self.miss_block

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        if self.spec.variant == "bat":
            return F.linear(x_rows, self.delta_weight())
        r = self.spec.r
        x = F.pad(self.dropout(x_rows), (0, -x_rows.shape[-1] % r))  # (N, ceil(in/r)*r)
        shard_sum = x.reshape(x.shape[0], -1, r).sum(dim=1)  # (N, r)
        return shard_sum @ self.shared_block()

    def delta_weight(self) -> torch.Tensor:
        out_features, in_features = self.base_layer.weight.shape
        r = self.spec.r
        if self.spec.variant != "bat":
            return self.shared_block().T.repeat(1, math.ceil(in_features / r))[:, :in_features]  # (out, in)
        blocks = _blocks(self.base_layer.weight, r)  # (out/r, in/r, r, r)
        block = self.miss_block.unsqueeze(1)  # (out/r, 1, r, r)
        return _unblock(blocks @ block + block)

    @torch.no_grad()
    def unmerge(self) -> None:
        """bat: ``W0_ij = (W'_ij - D_i)(I + D_i)^-1``; the others subtract the delta."""
        if self.spec.variant != "bat":
            return super().unmerge()
        self._check_merged(True)
        weight = self.base_layer.weight
        block = self.miss_block.double().unsqueeze(1)  # (out/r, 1, r, r)
        shifted = torch.eye(self.spec.r, dtype=torch.float64, device=weight.device) + block
        condition = torch.linalg.cond(shifted).max().item()
        if not condition <= MAX_UNMERGE_CONDITION:
            raise ValueError(
                f"cannot unmerge miss (bat): I + D is ill-conditioned (condition number {condition:.3g} > "
                f"{MAX_UNMERGE_CONDITION:g}), so W0 cannot be recovered accurately; the layer stays merged"
            )
        restored = torch.linalg.solve(shifted, _blocks(weight.double(), self.spec.r) - block, left=False)
        weight.copy_(_unblock(restored))
        self.merged = False


def _blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(out, in) -> (out/r, in/r, r, r): block [i, j] is rows i*r.., columns j*r.."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // r, r, in_features // r, r).transpose(1, 2)


def _unblock(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_blocks`."""
    rows, cols, r, _ = blocks.shape
    return blocks.transpose(1, 2).reshape(rows * r, cols * r)


def _check_shape(spec: MiSSSpec, out_features: int, in_features: int) -> None:
    layer = f"miss ({spec.variant}) on a {in_features}->{out_features} layer"
    if spec.r > in_features:
        raise InputError(f"{layer}: r={spec.r} is larger than in_features={in_features}")
    if spec.variant == "bat" and (in_features % spec.r or out_features % spec.r):
        raise InputError(f"{layer}: r={spec.r} must divide both in_features and out_features (r x r blocks)")
    if spec.variant == "mini" and out_features % spec.mini_r:
        raise InputError(f"{layer}: mini_r={spec.mini_r} must divide out_features={out_features}")
