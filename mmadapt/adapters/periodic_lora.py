"""PeriodicLoRA (arXiv 2402.16141; "PLoRA" in its paper): LoRA unloaded and restarted every stage.

Training runs in stages of ``stage_steps`` optimizer steps. At the end of each stage
the adapter *unloads* ``(1 - beta) * s * B A`` into a frozen accumulator ``delta_acc``
and keeps ``B <- beta * B``, so the function is unchanged across the unload; A and B's
optimizer moments are cleared and, by default, the LR schedule restarts. With
``beta = 0`` (plain PeriodicLoRA) B becomes zero and A is redrawn; with ``beta > 0``
("momentum unloading") A is kept, since a new A under a non-zero B would change the
function. Over K stages the total update ``delta_acc + s * B A`` reaches rank K * r.

The paper unloads into the backbone weight; here ``delta_acc`` is an adapter-owned
dense ``(out, in)`` buffer in the layer's dtype, applied only on the adapter's rows, so
text rows still run the untouched base model. It costs one base-weight-sized buffer per
adapted layer and a dense product on the adapter's rows. Redrawn A values come from
``StepContext.generator`` keyed by the run seed, the step and a per-adapter seed drawn
at construction and saved as a buffer, so every rank and every resume draws the same.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..hooks import StepContext
from .lora import LoRA, LoRASpec
from .registry import register_adapter


class PeriodicLoRASpec(LoRASpec):
    stage_steps: int = Field(100, gt=0, description="optimizer steps per stage; B A is unloaded at the end of each")
    beta: float = Field(0.0, ge=0.0, lt=1.0, description="momentum unloading: fraction of B kept (0: A redrawn)")
    restart_lr: bool = Field(True, description="restart the warm-up + cosine LR schedule at every stage")


@register_adapter("periodic_lora")
class PeriodicLoRA(LoRA):
    spec_class = PeriodicLoRASpec
    zero_stages = (0, 1, 2)
    zero_stage_reason = "it rewrites A and B at stage ends through the optimizer's full master copy"

    def __init__(self, base: nn.Module, spec: PeriodicLoRASpec) -> None:
        super().__init__(base, spec)
        self.register_buffer("delta_acc", torch.zeros_like(base.weight))  # (out, in), frozen
        # The global RNG is seeded alike on every rank at construction; a resume restores the buffer.
        self.register_buffer("reinit_seed", torch.randint(0, 2**62, (1,)))

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        # DeepSpeed keeps buffers fp32 under bf16: accumulate in fp32, multiply in the rows' dtype.
        return nn.functional.linear(x_rows, self.delta_acc.to(x_rows.dtype)) + super().forward(x_rows)

    def delta_weight(self) -> torch.Tensor:
        return self.delta_acc + super().delta_weight()  # (out, in)

    def stage_steps(self) -> int:
        return self.spec.stage_steps

    def restarts_lr(self) -> bool:
        return self.spec.restart_lr

    @torch.no_grad()
    def end_stage(self, ctx: StepContext) -> None:
        """Unload ``(1 - beta) s B A``, keep ``beta B`` (redraw A when beta is 0), clear A and B's moments."""
        a, b, beta = self.lora_A.weight, self.lora_B.weight, self.spec.beta
        master_a, master_b = ctx.read(a), ctx.read(b)  # the optimizer's fp32 values, not a bf16 copy
        self.delta_acc += ((1 - beta) * self.scaling * master_b @ master_a).to(self.delta_acc.dtype)  # (out, in)
        ctx.write(b, beta * master_b)
        if beta == 0:
            ctx.write(a, self._fresh_A(ctx))
        ctx.reset_optimizer_state([a, b])

    def _fresh_A(self, ctx: StepContext) -> torch.Tensor:
        """LoRA's Kaiming-uniform init of A, from a generator every rank and every resume repeat."""
        fresh = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)  # (r, in)
        generator = ctx.generator("periodic_lora", int(self.reinit_seed))
        return nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator).to(self.lora_A.weight.device)
