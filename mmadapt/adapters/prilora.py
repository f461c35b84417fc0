"""PRILoRA (arXiv 2401.11316): LoRA whose rank rises with depth and whose A is pruned as it trains.

Rank: block ``l`` of ``L`` (the first number in the module name, ``model.layers.3.…``,
counted among the blocks the entry matched) gets ``r_l = round(r_min + (r_max - r_min) l / (L-1))``
with ``r_max = 2 r - r_min``, so ranks rise linearly and average exactly ``r``; the scale
is ``alpha / r_l``. Each placed copy's ``spec.r`` is its block's rank.

Pruning: every micro-batch forward in training adds the squared input features of the
adapter's rows to ``input_sq_sum``; once per step (``before_step``) their sum over
micro-batches and ranks gives ``||X_{:,j}||``, folded into ``feature_ema``
(``ema <- d * ema + (1 - d) * ||X_{:,j}||``). Every ``prune_every`` steps the fraction
``prune_fraction`` of each row of A with the smallest ``S_ij = |A_ij| * ema_j`` is zeroed.
Pruned entries may regrow (the paper's "temporary" pruning) unless ``persistent_mask``
keeps them at zero until the next pruning event. Merge and forward are LoRA's.
"""

from __future__ import annotations

import re
from fractions import Fraction

import torch
import torch.distributed as dist
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from ..errors import InputError
from ..hooks import StepContext
from .lora import LoRA, LoRASpec
from .registry import register_adapter

_BLOCK = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")  # prefix of a numbered block, its number


class PRILoRASpec(LoRASpec):
    r: int = Field(8, gt=0, description="mean rank over the blocks; ranks rise linearly from r_min to 2 r - r_min")
    r_min: int | None = Field(None, gt=0, description="rank of the first block (default: r // 2, at least 1)")
    prune_every: int = Field(100, gt=0, description="optimizer steps between pruning events")
    prune_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of each row of A zeroed at an event")
    ema_decay: float = Field(0.9, ge=0.0, lt=1.0, description="decay of the moving average of input feature norms")
    persistent_mask: bool = Field(False, description="keep pruned entries at zero until the next event")

    @field_validator("r_min")
    @classmethod
    def _at_most_r(cls, r_min: int | None, info: ValidationInfo) -> int | None:
        if r_min is not None and r_min > info.data.get("r", r_min):
            raise ValueError(f"the first block's rank must not exceed the mean rank r ({info.data['r']})")
        return r_min

    @model_validator(mode="after")
    def _default_r_min(self) -> PRILoRASpec:
        if self.r_min is None:
            self.r_min = max(1, self.r // 2)
        return self


@register_adapter("prilora")
class PRILoRA(LoRA):
    spec_class = PRILoRASpec
    zero_stages = (0, 1, 2)
    zero_stage_reason = "it writes pruned A through the optimizer's full master copy"

    def __init__(self, base: nn.Module, spec: PRILoRASpec) -> None:
        super().__init__(base, spec)
        in_features = self.lora_A.weight.shape[1]
        self.register_buffer("feature_ema", torch.zeros(in_features))  # (in,)
        # Zero between steps, so checkpoints never need it.
        self.register_buffer("input_sq_sum", torch.zeros(in_features), persistent=False)  # (in,)
        if spec.persistent_mask:
            self.register_buffer("keep_A", torch.ones_like(self.lora_A.weight, dtype=torch.bool))  # (r, in)

    @classmethod
    def layer_spec(cls, spec: PRILoRASpec, name: str, names: list[str]) -> PRILoRASpec:
        """The entry's spec with ``r`` set to the rank of ``name``'s block."""
        depth, blocks = _depth(name, names, spec)
        rise = 2 * (spec.r - spec.r_min)  # r_max - r_min
        rank = spec.r if blocks == 1 else spec.r_min + round(Fraction(rise * depth, blocks - 1))  # exact, half to even
        return spec.model_copy(update={"r": rank})

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        if self.training and not _inside_backward():  # inside backward: a checkpoint recompute, already counted
            self.input_sq_sum += x_rows.detach().float().square().sum(0).to(self.input_sq_sum.dtype)
        return super().forward(x_rows)

    @torch.no_grad()
    def before_step(self, ctx: StepContext) -> None:
        """Fold this step's input norms (all micro-batches, all ranks) into the moving average."""
        sq_sum = self.input_sq_sum.float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq_sum)
        decay = self.spec.ema_decay
        self.feature_ema.copy_(decay * self.feature_ema.float() + (1 - decay) * sq_sum.sqrt())
        self.input_sq_sum.zero_()

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """At a pruning event zero the least important entries of A; with a persistent mask, keep them zero."""
        a = self.lora_A.weight
        if (ctx.step + 1) % self.spec.prune_every == 0:
            keep = self._kept_entries()
            if self.spec.persistent_mask:
                self.keep_A.copy_(keep)
            ctx.write(a, ctx.read(a).masked_fill(~keep, 0))
        elif self.spec.persistent_mask:
            ctx.write(a, ctx.read(a).masked_fill(~self.keep_A, 0))

    def _kept_entries(self) -> torch.Tensor:
        """Bool (r, in): False at the ``floor(p * in)`` entries of each row of A with the smallest S_ij."""
        a = self.lora_A.weight
        importance = a.float().abs() * self.feature_ema.float()  # (r, in)
        count = int(self.spec.prune_fraction * a.shape[1])
        dropped = importance.topk(count, dim=1, largest=False).indices  # (r, count)
        return torch.ones_like(a, dtype=torch.bool).scatter_(1, dropped, False)


def _depth(name: str, names: list[str], spec: PRILoRASpec) -> tuple[int, int]:
    """Position of ``name``'s block among the matched blocks of the same stack, and their count."""
    found = _BLOCK.match(name)
    if found is None:
        raise InputError(
            f"prilora targets {spec.targets}: module {name!r} is not inside a numbered block "
            "(like model.layers.3.…), so it has no depth for the rank schedule"
        )
    prefix, index = found.group(1), int(found.group(2))
    blocks = sorted({int(m.group(2)) for m in map(_BLOCK.match, names) if m and m.group(1) == prefix})
    return blocks.index(index), len(blocks)


def _inside_backward() -> bool:
    """True while autograd runs a backward pass (where gradient checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1
