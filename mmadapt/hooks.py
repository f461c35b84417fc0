"""Hook points through which adapter methods act on the training loop.

The trainer runs, for each optimizer step::

    ctx = hooks.context(step)                       # which data split, writer for parameters
    for micro-batch in split ctx.split:
        loss = model(...) + hooks.extra_loss(ctx)   # regularisers (BiLoRA's orthogonality, TRP's nuclear norm)
        backward(loss)                              # gradient hooks edit each micro-batch's gradient
    hooks.before_step(ctx); optimizer step; hooks.after_step(ctx)   # stage ends call end_stage

Every method stays in its own adapter file and overrides the :class:`Adapter` hooks it
needs; this module only collects them. :class:`StepContext` is how a hook changes a
parameter or the optimizer: under ZeRO 1-2 the optimizer keeps its own fp32 master copy
of each parameter, so writing ``param.data`` alone would be undone by the next step.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from .adapters.base import Adapter
from .adapters.inject import adapters_of
from .errors import InputError


@dataclass
class StepContext:
    """What a hook may know and do at one optimizer step.

    Attributes:
        step: optimizer steps completed before this one.
        split: the data split this step's batches come from (None without splits).
        seed: the run's ``train.seed``, for draws every rank repeats identically.
        optimizer: the optimizer DeepSpeed steps (a ZeRO wrapper under stages 1-3).
    """

    step: int
    split: str | None = None
    seed: int = 0
    optimizer: torch.optim.Optimizer | None = None

    @torch.no_grad()
    def read(self, param: nn.Parameter) -> torch.Tensor:
        """The value the optimizer holds: its fp32 master copy when it keeps one (under ZeRO
        1-2 a collective: every rank calls it), else the parameter itself. Read-modify-write
        through this, so a bf16 model copy does not round away updates."""
        from deepspeed.utils import safe_get_full_fp32_param

        if _partitioned(param):
            return safe_get_full_fp32_param(param).to(param.device)
        return self._plain_master(param).detach().clone()

    @torch.no_grad()
    def write(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Set ``param`` to ``value`` in the model and in the optimizer's master copy."""
        from deepspeed.utils import safe_set_full_fp32_param

        param.data.copy_(value.to(param.dtype))
        if _partitioned(param):
            safe_set_full_fp32_param(param, value.to(torch.float32))
        else:
            master = self._plain_master(param)
            if master is not param:
                master.copy_(value.to(master.dtype))

    def optimizer_state(self, param: nn.Parameter, key: str) -> torch.Tensor | None:
        """The optimizer's full state ``key`` (e.g. Adam's ``exp_avg``) of ``param``; None before its first step."""
        from deepspeed.utils import safe_get_full_optimizer_state

        if _partitioned(param):
            return safe_get_full_optimizer_state(param, key)
        if self.optimizer is None:
            return None
        return self._plain_optimizer().state.get(self._plain_master(param), {}).get(key)

    @torch.no_grad()
    def set_optimizer_state(self, param: nn.Parameter, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if _partitioned(param):
            safe_set_full_optimizer_state(param, value, key)
        else:
            self._plain_optimizer().state[self._plain_master(param)][key].copy_(value)

    def reset_optimizer_state(self, params: list[nn.Parameter]) -> None:
        """Zero the optimizer's moment estimates of ``params`` (Adam: exp_avg, exp_avg_sq).

        Under ZeRO the step counter belongs to the whole flat partition, so bias
        correction does not restart; with a plain optimizer (ZeRO 0) it does.
        """
        for param in params:
            if _partitioned(param):
                for key in ("exp_avg", "exp_avg_sq"):
                    state = self.optimizer_state(param, key)
                    if state is not None:
                        self.set_optimizer_state(param, key, torch.zeros_like(state))
            elif self.optimizer is not None:
                self._plain_optimizer().state.pop(self._plain_master(param), None)

    def _plain_optimizer(self) -> torch.optim.Optimizer:
        """ZeRO 0: the torch optimizer, inside DeepSpeed's bf16/fp16 wrapper when there is one."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _plain_master(self, param: nn.Parameter) -> torch.Tensor:
        """ZeRO 0 with bf16/fp16: the wrapper's fp32 copy of ``param`` (it keys the optimizer
        state and overwrites the model copy each step); without a wrapper, ``param`` itself."""
        low = getattr(self.optimizer, "fp16_groups", None) or []
        masters = getattr(self.optimizer, "fp32_groups", None) or []
        for group, master_group in zip(low, masters):
            for index, candidate in enumerate(group):
                if candidate is param:
                    return master_group[index]
        return param

    def generator(self, *keys: object) -> torch.Generator:
        """A generator seeded by the run seed, this step and ``keys``: the same on every rank."""
        text = "/".join(str(k) for k in (self.seed, self.step, *keys))
        return torch.Generator().manual_seed(zlib.crc32(text.encode()))


def _partitioned(param: nn.Parameter) -> bool:
    """ZeRO 1-3 (and DeepSpeed's bf16 optimizer) keep master copy and moments in flat partitions."""
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


class TrainingHooks:
    """The training hooks of every adapter in ``model``, called by the trainer."""

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        self.adapters: list[tuple[str, Adapter]] = list(adapters_of(model))
        self.seed = seed
        self.splitter = self._splitter()
        self.stages = {name: a.stage_steps() for name, a in self.adapters if a.stage_steps()}

    def check_zero_stage(self, stage: int) -> None:
        """Refuse a ZeRO stage some adapter's method does not support, naming it and why."""
        for name, adapter in self.adapters:
            if stage not in adapter.zero_stages:
                supported = ", ".join(str(s) for s in adapter.zero_stages)
                raise InputError(
                    f"deepspeed.zero_stage={stage}: adapter {adapter.spec.type} ({name}) supports ZeRO stages "
                    f"{supported} only{': ' + adapter.zero_stage_reason if adapter.zero_stage_reason else ''}"
                )

    def register_gradient_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for _, adapter in self.adapters:
            params = dict(adapter.named_parameters())
            for param_name, edit in adapter.gradient_hooks().items():
                if params[param_name].requires_grad:
                    handles.append(params[param_name].register_hook(edit))
        return handles

    def context(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> StepContext:
        split = self.splitter.split_for_step(step) if self.splitter else None
        return StepContext(step=step, split=split, seed=self.seed, optimizer=optimizer)

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        terms = [t for _, a in self.adapters if (t := a.extra_loss(ctx)) is not None]
        return torch.stack(terms).sum() if terms else None

    def before_step(self, ctx: StepContext) -> None:
        for _, adapter in self.adapters:
            adapter.before_step(ctx)

    def after_step(self, ctx: StepContext) -> None:
        """After the update of step ``ctx.step``: each adapter's hook, then stage ends."""
        done = ctx.step + 1
        for name, adapter in self.adapters:
            adapter.after_step(ctx)
            if name in self.stages and done % self.stages[name] == 0:
                adapter.end_stage(ctx)

    def lr_cycle(self) -> int | None:
        """Steps per LR-schedule cycle when a method restarts the schedule at its stage ends."""
        cycles = {a.stage_steps() for _, a in self.adapters if a.restarts_lr() and a.stage_steps()}
        if len(cycles) > 1:
            raise InputError(f"adapters restart the LR schedule at different stage lengths {sorted(cycles)}")
        return cycles.pop() if cycles else None

    def data_splits(self) -> dict[str, float] | None:
        return self.splitter.data_splits() if self.splitter else None

    def _splitter(self) -> Adapter | None:
        """The adapter that decides data splits; all adapters that declare splits must agree."""
        declaring = [a for _, a in self.adapters if a.data_splits()]
        if not declaring:
            return None
        if any(a.data_splits() != declaring[0].data_splits() for a in declaring):
            raise InputError("adapters declare different data splits; bi-level methods must share one split")
        return declaring[0]


@contextlib.contextmanager
def gradient_hooks(hooks: TrainingHooks):
    """Gradient edits registered for the duration of the block."""
    handles = hooks.register_gradient_hooks()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
