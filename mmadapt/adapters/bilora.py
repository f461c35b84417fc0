"""BiLoRA (arXiv 2403.13037): a pseudo-SVD delta trained by bi-level alternation on two data splits.

``delta = s * P diag(lam) Q x`` with ``s = alpha / r``; P (out x r) and Q (r x in) start
small Gaussian and ``lam`` (r,) at zero, so the adapted model starts at the base model.

Training alternates ``inner_steps`` *lower* steps and one *upper* step. The trainer
draws each step's batches from the split :meth:`BiLoRA.split_for_step` names
(``data_splits``: ``lower`` and ``upper``, disjoint, ``upper_fraction`` of the train set
for the upper level):

- lower step: P, Q train on the lower split, loss ``L + orth_weight * R`` with
  ``R = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2`` (summed over BiLoRA layers);
- upper step: ``lam`` trains on the upper split with the plain loss.

The hypergradient of ``lam`` is first-order: P and Q are held at their current values
(the paper's optional one-step unrolled hypergradient is not implemented).

One optimizer serves both levels instead of the paper's two. Two mechanisms make a
step change exactly its own level:

1. Gradient hooks zero the other level's gradients on every micro-batch. The hooks
   run inside backward, so they read the step's split from ``self.split``, which
   :meth:`BiLoRA.extra_loss` sets from ``ctx.split``: the trainer (and
   ``tests/adapters/hook_loop.py``) call ``extra_loss(ctx)`` on every micro-batch
   after the forward and before ``backward``. A hook that finds no split raises.
2. AdamW still moves a parameter whose gradient is zero (momentum, weight decay), so
   :meth:`BiLoRA.before_step` snapshots the level that must not change and
   :meth:`BiLoRA.after_step` writes it back through ``ctx.write`` (model copy and the
   optimizer's master copy): the frozen level is bit-identical after the step.

One difference from two separate optimizers remains: the frozen level's Adam moments
still decay on its off-steps (its gradient is zero there) instead of pausing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import nn

from ..hooks import StepContext
from .base import Adapter, AdapterSpec
from .registry import register_adapter

LOWER, UPPER = "lower", "upper"


class BiLoRASpec(AdapterSpec):
    upper_fraction: float = Field(
        1 / 3, gt=0.0, lt=1.0, description="share of the train set used for the upper level (lam)"
    )
    inner_steps: int = Field(1, ge=1, description="lower steps (P, Q) before each upper step (lam)")
    orth_weight: float = Field(0.1, ge=0.0, description="gamma: weight of the orthogonality regulariser on lower steps")
    init_std: float = Field(0.02, gt=0.0, description="std of the Gaussian init of P and Q")


@register_adapter("bilora")
class BiLoRA(Adapter):
    spec_class = BiLoRASpec
    zero_stages = (0, 1, 2)
    zero_stage_reason = "it restores the level frozen at each step through the optimizer's full master copy"

    def __init__(self, base: nn.Module, spec: BiLoRASpec) -> None:
        super().__init__(base, spec)
        out_features, in_features = base.weight.shape
        dtype = base.weight.dtype
        self.P = nn.Parameter(torch.randn(out_features, spec.r, dtype=dtype) * spec.init_std)
        self.Q = nn.Parameter(torch.randn(spec.r, in_features, dtype=dtype) * spec.init_std)
        self.lam = nn.Parameter(torch.zeros(spec.r, dtype=dtype))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.scaling = spec.alpha / spec.r
        self.split: str | None = None  # the current step's split, set by extra_loss for the gradient hooks
        self._frozen: list[tuple[nn.Parameter, torch.Tensor]] = []

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        hidden = self.dropout(x_rows) @ self.Q.T  # (N, r)
        return (hidden * (self.lam * self.scaling)) @ self.P.T

    def delta_weight(self) -> torch.Tensor:
        return (self.P * (self.lam * self.scaling)) @ self.Q  # (out, in)

    # ---- bi-level training --------------------------------------------------------------
    def data_splits(self) -> dict[str, float]:
        return {LOWER: 1.0 - self.spec.upper_fraction, UPPER: self.spec.upper_fraction}

    def split_for_step(self, step: int) -> str:
        return UPPER if step % (self.spec.inner_steps + 1) == self.spec.inner_steps else LOWER

    def orthogonality(self) -> torch.Tensor:
        """``R = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2`` in fp32."""
        p, q = self.P.float(), self.Q.float()
        eye = torch.eye(self.spec.r, device=p.device)
        return (p.T @ p - eye).square().sum() + (q @ q.T - eye).square().sum()

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        self.split = ctx.split
        return self.spec.orth_weight * self.orthogonality() if ctx.split == LOWER else None

    def gradient_hooks(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {"P": self._level_gate(LOWER), "Q": self._level_gate(LOWER), "lam": self._level_gate(UPPER)}

    def _level_gate(self, level: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def gate(grad: torch.Tensor) -> torch.Tensor:
            if self.split is None:
                raise RuntimeError("bilora: a gradient arrived before extra_loss(ctx) named the step's data split")
            return grad if self.split == level else torch.zeros_like(grad)

        return gate

    @torch.no_grad()
    def before_step(self, ctx: StepContext) -> None:
        frozen = [self.lam] if ctx.split == LOWER else [self.P, self.Q]
        self._frozen = [(param, ctx.read(param)) for param in frozen]

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        for param, value in self._frozen:
            ctx.write(param, value)
        self._frozen, self.split = [], None
