"""StepContext under a one-process DeepSpeed engine: writes and optimizer resets reach ZeRO's master copy."""

import pytest
import torch
from torch import nn

from mmadapt import distributed
from mmadapt.hooks import StepContext


def _engine(stage: int, bf16: bool):
    deepspeed = pytest.importorskip("deepspeed")
    distributed.init(threads=torch.get_num_threads())  # the single-process environment train.py sets
    torch.manual_seed(0)
    model = nn.Linear(6, 4, bias=False)
    config = {
        "train_micro_batch_size_per_gpu": 1, "train_batch_size": distributed.world_size(),
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9, "bf16": {"enabled": bf16},
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _step(engine) -> None:
    x = torch.randn(3, 6, dtype=next(engine.module.parameters()).dtype)
    engine.backward(engine(x).float().pow(2).sum())
    engine.step()


@pytest.mark.parametrize(("stage", "bf16"), [(0, False), (1, False), (2, False), (0, True), (2, True)])
def test_write_survives_the_next_step_and_reset_zeroes_the_moments(stage, bf16):
    """bf16 keeps an fp32 master copy under every stage (ZeRO 0: DeepSpeed's wrapper optimizer)."""
    engine = _engine(stage, bf16)
    weight = engine.module.weight
    _step(engine)
    ctx = StepContext(step=1, optimizer=engine.optimizer)
    value = torch.arange(24.0).view(4, 6)
    ctx.write(weight, value)
    assert torch.equal(ctx.read(weight), value)
    ctx.reset_optimizer_state([weight])
    for key in ("exp_avg", "exp_avg_sq"):
        state = ctx.optimizer_state(weight, key)
        assert state is None or torch.count_nonzero(state) == 0
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0  # a step that cannot move the weight: what it holds afterwards is the master copy
    _step(engine)
    assert torch.equal(weight.detach().float(), value)
    assert torch.equal(ctx.read(weight), value)
