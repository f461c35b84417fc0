"""Flora as an adapter (arXiv 2402.03293, adapter form): a frozen random A, resampled every kappa steps.

``delta = x delta_acc^T + B A_t dropout(x)`` with A_t (r, in) a frozen Gaussian N(0, 1/r) and
B (out, r) trainable from zero. Its gradient ``dL/dB = G A_t^T`` makes each step of B a
step of W along the randomly compressed gradient ``G A_t^T A_t`` (``E[A^T A] = I``); there is
no alpha / r scale, the variance of A does that job. Every ``kappa`` steps the adapter
folds ``B A_t`` into ``delta_acc``, sets B to zero, draws A_{t+1}, and moves B's Adam moments
to the new basis: ``M_B <- M_B A_t A_{t+1}^T``. The second moment's columns belong to the
old random directions, but its rows are B's output features, which do not change: by
default (``second_moment: row_mean``) each row is reset to its mean, keeping its scale;
``zero`` zeroes it as the spec sheet says, which, with Adam's step count running on
(ZeRO keeps one per partition), makes the first steps after each resample up to
``1 / sqrt(1 - beta2)`` times too large.

The paper's own method is an optimizer (``train.optimizer=flora_opt``, :mod:`mmadapt.optim.flora`);
this is its LoRA-shaped form. ``delta_acc`` is a dense (out, in) buffer in the layer's
dtype, applied only on the adapter's rows (text rows run the base model); it costs one
base-weight-sized buffer per adapted layer. A is a saved buffer; redraws come from
``StepContext.generator`` keyed by the run seed, the step and a per-adapter seed drawn at
construction (also saved), so every rank and every resume draws the same.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..hooks import StepContext
from .base import Adapter, AdapterSpec
from .registry import register_adapter


class FloraOptSpec(AdapterSpec):
    kappa: int = Field(1000, gt=0, description="optimizer steps between resamples of the random A (flora-opt: 1000)")
    second_moment: Literal["row_mean", "zero"] = Field(
        "row_mean", description="B's Adam second moment at a resample: each row's mean, or zero"
    )

    @model_validator(mode="after")
    def _no_alpha(self) -> FloraOptSpec:
        if "alpha" in self.model_fields_set:
            raise ValueError("flora_opt has no alpha / r scale (A ~ N(0, 1/r) sets it); remove alpha")
        return self


@register_adapter("flora_opt")
class FloraOpt(Adapter):
    spec_class = FloraOptSpec
    zero_stages = (0, 1, 2)
    zero_stage_reason = (
        "it rewrites B after a step through StepContext.write, which needs the whole parameter on every rank"
    )

    def __init__(self, base: nn.Module, spec: FloraOptSpec) -> None:
        super().__init__(base, spec)
        weight = base.weight
        out_features, in_features = weight.shape
        self.lora_B = nn.Parameter(torch.zeros(out_features, spec.r, dtype=weight.dtype, device=weight.device))
        # The global RNG is seeded alike on every rank at construction; a resume restores both buffers.
        self.register_buffer("lora_A", _gaussian((spec.r, in_features), None).to(weight))  # (r, in), frozen
        self.register_buffer("draw_seed", torch.randint(0, 2**62, (1,)))
        self.register_buffer("delta_acc", torch.zeros_like(weight))  # (out, in), frozen
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        # In the buffers' dtype: DeepSpeed's bf16 mode casts parameters but leaves float buffers in fp32.
        x = x_rows.to(self.delta_acc.dtype)
        low_rank = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B.to(x.dtype))
        return nn.functional.linear(x, self.delta_acc) + low_rank

    def delta_weight(self) -> torch.Tensor:
        return self.delta_acc + self.lora_B @ self.lora_A  # (out, in)

    def stage_steps(self) -> int:
        return self.spec.kappa

    @torch.no_grad()
    def end_stage(self, ctx: StepContext) -> None:
        """Fold ``B A_t`` into ``delta_acc``, zero B, draw A_{t+1} and move B's moments to it."""
        b = ctx.read(self.lora_B).float()  # (out, r)
        old_a = self.lora_A.float()
        new_a = _gaussian(old_a.shape, ctx.generator("flora_opt", int(self.draw_seed))).to(old_a.device)
        self.delta_acc += (b @ old_a).to(self.delta_acc.dtype)
        ctx.write(self.lora_B, torch.zeros_like(b))
        self._move_moments(ctx, old_a @ new_a.T)
        self.lora_A.copy_(new_a.to(self.lora_A.dtype))

    def _move_moments(self, ctx: StepContext, change: torch.Tensor) -> None:  # change: A_t A_{t+1}^T (r, r)
        first, second = (ctx.optimizer_state(self.lora_B, key) for key in ("exp_avg", "exp_avg_sq"))
        if first is None or second is None:  # B never had a gradient: no moments yet
            return
        ctx.set_optimizer_state(self.lora_B, "exp_avg", first.float() @ change)
        if self.spec.second_moment == "row_mean":
            second = second.mean(dim=1, keepdim=True).expand_as(second)  # (out, r): one value per output feature
        else:
            second = torch.zeros_like(second)
        ctx.set_optimizer_state(self.lora_B, "exp_avg_sq", second)


def _gaussian(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """N(0, 1/r) entries for an (r, in) projection, so that ``E[A^T A] = I``."""
    return torch.randn(shape, generator=generator) / math.sqrt(shape[0])
