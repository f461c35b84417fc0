"""TRP (Trained Rank Pruning, arXiv 1812.02402 / 2004.14566), project form: on a LoRA's own delta.

The paper trains full weights and, every ``m`` steps, replaces each weight by its
truncated SVD, keeping the smallest rank ``k`` whose singular values hold a fraction
``e`` of the energy (``sum_{i<=k} s_i^2 >= e * sum_i s_i^2``), with an optional nuclear
norm penalty ``lambda * ||W||_*``. Here the same acts on the adapter's own
``dW = s * B A`` (LoRA forward, init and merge); W0 is never touched, so text rows
stay the base model.

- **Substitution** (``after_step``, every ``period`` steps): the SVD of dW comes cheaply
  through QR of the factors, ``B = Q_B R_B``, ``A^T = Q_A R_A``,
  ``dW = Q_B (s R_B R_A^T) Q_A^T``, and the SVD of the r x r core. dW becomes its best
  rank-k approximation ``U_k U_k^T dW`` by projecting B alone: ``B <- U_k U_k^T B``, A
  unchanged. Parameter shapes never change, the entries keep their meaning, so the
  Adam moments are kept (TRP's code likewise leaves SGD momentum alone), and A keeps
  r input directions along which B can grow rank again if the loss needs it
  (re-factorising both factors with zero padding would park the dropped components at
  a saddle whose gradient is zero for good).
- **Nuclear norm** (``extra_loss``, weight ``nuclear_weight``): the surrogate
  ``lambda * <U V^T, dW>`` with U, V the singular vectors (no gradient through them)
  equals ``lambda * ||dW||_*`` and its gradient is the subgradient ``U V^T`` chained into
  B and A. Singular values at rounding level are left out, so at ``dW = 0`` (init) the
  term pushes nowhere instead of along an arbitrary ``U V^T``.

Substituting twice equals substituting once whenever the kept values themselves need
all k to reach ``e``; otherwise each substitution may cut further, as repeated
truncation does in the paper.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..hooks import StepContext
from .lora import LoRA, LoRASpec
from .registry import register_adapter


class TRPSpec(LoRASpec):
    energy: float = Field(
        0.99, gt=0.0, le=1.0, description="e: fraction of dW's squared singular values the truncation keeps"
    )
    period: int = Field(1, ge=1, description="m: truncate dW after every m optimizer steps")
    nuclear_weight: float = Field(
        0.0, ge=0.0, description="lambda of the nuclear-norm penalty on dW (the paper's setting: 3e-4; 0: off)"
    )


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """The smallest k with ``sum_{i<=k} sigma_i^2 >= energy * sum_i sigma_i^2`` (sigma sorted descending)."""
    cumulative = sigma.square().cumsum(0)
    return int((cumulative < energy * cumulative[-1]).sum()) + 1


@register_adapter("trp")
class TRP(LoRA):
    spec_class = TRPSpec
    zero_stages = (0, 1, 2)
    zero_stage_reason = "it writes the truncated factor after each step through the optimizer's full master copy"

    @torch.no_grad()
    def delta_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dW = U diag(sigma) V^T`` in fp32 from QR of the factors, never forming dW.

        Returns:
            ``(U, sigma, V)``: U (out, c), sigma (c,) descending, V (in, c), c <= r.
        """
        q_b, r_b = torch.linalg.qr(_at_least_fp32(self.lora_B.weight))  # (out, r'), (r', r)
        q_a, r_a = torch.linalg.qr(_at_least_fp32(self.lora_A.weight).T)  # (in, r''), (r'', r)
        u, sigma, vh = torch.linalg.svd(self.scaling * r_b @ r_a.T, full_matrices=False)  # core (r', r'')
        return q_b @ u, sigma, q_a @ vh.T

    @torch.no_grad()
    def truncate(self, ctx: StepContext) -> None:
        """Replace dW by its smallest-rank truncation that keeps ``energy`` (projects B only)."""
        u, sigma, _ = self.delta_svd()
        if not sigma.any():  # dW = 0: nothing to keep or drop
            return
        kept = u[:, : energy_rank(sigma, self.spec.energy)]  # (out, k)
        b = self.lora_B.weight
        ctx.write(b, kept @ (kept.T @ _at_least_fp32(ctx.read(b))))

    def after_step(self, ctx: StepContext) -> None:
        if (ctx.step + 1) % self.spec.period == 0:
            self.truncate(ctx)

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        if not self.spec.nuclear_weight:
            return None
        return self.spec.nuclear_weight * self.nuclear_norm()

    def nuclear_norm(self) -> torch.Tensor:
        """``||dW||_*`` whose gradient is the subgradient ``U V^T`` over dW's non-negligible singular values."""
        u, sigma, v = self.delta_svd()
        live = sigma > sigma.max() * max(u.shape[0], v.shape[0]) * torch.finfo(sigma.dtype).eps
        u, v = u[:, live], v[:, live]  # (out, c), (in, c)
        b, a = _at_least_fp32(self.lora_B.weight), _at_least_fp32(self.lora_A.weight)
        return self.scaling * ((u.T @ b) * (a @ v).T).sum()  # s * trace(U^T B A V) = sum of live sigma


def _at_least_fp32(weight: torch.Tensor) -> torch.Tensor:
    """QR and SVD need fp32 (bf16 has no LAPACK path); fp64 stays fp64."""
    return weight.to(torch.promote_types(weight.dtype, torch.float32))
