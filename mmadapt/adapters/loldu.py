"""LoLDU (arXiv 2410.13618): train only the diagonal of an LDU decomposition of W0.

At build time ``W0 = P L D U`` (LU with partial pivoting, L unit lower, U unit upper,
D the pivots). The first ``r`` pivots give frozen ``L_r`` (out x r) and ``U_r`` (r x in);
the trainable numbers are ``z`` (r, initialised to ``D_r``) and a scale ``sigma``
(initialised to ``sigma0 = alpha / r``; frozen with ``train_sigma: false``).

The official code writes the residual ``W0 - sigma0 P L_r diag(D_r) U_r`` into the base
weight. This is its exactly equivalent "project form", which leaves W0 untouched::

    delta_weight = P L_r diag(sigma * z - sigma0 * D_r) U_r

It is exactly zero at init (``sigma * z`` and ``sigma0 * D_r`` are the same product).
``P`` is kept as a row permutation (``perm``), never as a dense out x out matrix.

``L_r``, ``U_r``, ``D_r`` and ``perm`` are derived from the base weight *as it is when
the adapter is built* and are not saved: saved ``z`` and ``sigma`` only mean the same
update when reloaded onto a model injected on the same base weights (``load_trained``
checks the base fingerprint before injecting). Do not inject onto a merged weight.
"""

from __future__ import annotations

import warnings

import torch
from pydantic import Field
from torch import nn

from ..errors import InputError
from .base import Adapter, AdapterSpec
from .registry import register_adapter

MIN_PIVOT = 1e-6


class LoLDUSpec(AdapterSpec):
    r: int = Field(8, gt=0, description="number of LU pivots kept (the first r, not the largest); at most min(in, out)")
    alpha: float = Field(16.0, description="sigma starts at alpha / r (the official code uses alpha = 1)")
    train_sigma: bool = Field(True, description="train the scale sigma with z (official code); false: only z")


def lu_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LU with partial pivoting, ``weight == P L U``, with P returned as row indices.

    Returns:
        ``(perm, L, U)``: ``perm`` (out,) with ``weight[i] == (L U)[perm[i]]``, L unit
        lower (out x k), U upper (k x in), ``k = min(out, in)``.
    """
    # lu_factor_ex: a zero pivot is a result here (clamped later), not an error.
    factors, pivots, _ = torch.linalg.lu_factor_ex(weight)
    _, lower, upper = torch.lu_unpack(factors, pivots, unpack_pivots=False)
    # LAPACK pivots: step i swapped rows i and pivots[i] - 1, so (L U)[i] == weight[rows[i]].
    rows = list(range(weight.shape[0]))
    for i, pivot in enumerate(pivots.tolist()):
        rows[i], rows[pivot - 1] = rows[pivot - 1], rows[i]
    perm = torch.argsort(torch.tensor(rows, device=weight.device))
    return perm, lower, upper


@register_adapter("loldu")
class LoLDU(Adapter):
    spec_class = LoLDUSpec

    def __init__(self, base: nn.Module, spec: LoLDUSpec) -> None:
        super().__init__(base, spec)
        out_features, in_features = base.weight.shape
        if spec.r > min(out_features, in_features):
            raise InputError(
                f"loldu: r={spec.r} exceeds min(out, in) = {min(out_features, in_features)} for a layer of "
                f"shape (out={out_features}, in={in_features}); an LU decomposition has no more pivots"
            )
        dtype = base.weight.dtype
        # LU in fp32 at least (float64 weights stay float64): bf16 pivots would be too coarse.
        weight = base.weight.detach().to(torch.promote_types(dtype, torch.float32))
        perm, lower, upper = lu_rows(weight)
        pivots_d = _clamped(torch.diagonal(upper)[: spec.r], (out_features, in_features))
        upper_r = upper[: spec.r] / pivots_d.unsqueeze(1)  # unit upper where no pivot was clamped
        self.register_buffer("perm", perm, persistent=False)  # (out,)
        self.register_buffer("lower", lower[:, : spec.r].to(dtype), persistent=False)  # L_r (out, r)
        self.register_buffer("upper", upper_r.to(dtype), persistent=False)  # U_r (r, in)
        self.register_buffer("pivots", pivots_d.to(dtype), persistent=False)  # D_r (r,)
        # shape (1,), not 0-dim: DeepSpeed broadcasts parameters viewed as bytes, which a 0-dim tensor cannot be
        self.register_buffer("sigma0", torch.tensor([spec.alpha / spec.r], dtype=dtype), persistent=False)
        self.z = nn.Parameter(self.pivots.clone())
        if spec.train_sigma:
            self.sigma = nn.Parameter(self.sigma0.clone())
        else:
            self.register_buffer("sigma", self.sigma0.clone(), persistent=False)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()

    def _diagonal(self) -> torch.Tensor:  # (r,)
        # Both products use the same operands at init, so the difference is exactly zero; under
        # DeepSpeed's bf16 z is bf16 while the buffers stay fp32, hence the pivots in z's rounding.
        return self.sigma * self.z - self.sigma0 * self.pivots.to(self.z.dtype)

    def _permuted_lower(self) -> torch.Tensor:  # P L_r, (out, r)
        return self.lower.index_select(0, self.perm)

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        dtype = x_rows.dtype  # the frozen factors are buffers, which DeepSpeed's bf16 leaves fp32
        hidden = self.dropout(x_rows) @ self.upper.to(dtype).T  # (N, r)
        return (hidden * self._diagonal().to(dtype)) @ self._permuted_lower().to(dtype).T

    def delta_weight(self) -> torch.Tensor:
        return (self._permuted_lower() * self._diagonal()) @ self.upper


def _clamped(pivots_d: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Keep |D| >= MIN_PIVOT so that U / D stays finite; ``diag(D) (U / D)`` is still ``U``."""
    tiny = pivots_d.abs() < MIN_PIVOT
    if tiny.any():
        warnings.warn(
            f"loldu: {int(tiny.sum())} of the first {pivots_d.numel()} LU pivots of a weight of shape "
            f"(out={shape[0]}, in={shape[1]}) are below {MIN_PIVOT:g} in magnitude; clamped to +-{MIN_PIVOT:g} "
            "(those directions of the update are ill-conditioned; consider a smaller r)",
            stacklevel=3,
        )
    return torch.where(tiny, torch.where(pivots_d < 0, -MIN_PIVOT, MIN_PIVOT), pivots_d)
