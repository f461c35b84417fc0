"""Every training-loop method (issue 7) trains the shapes task on two DeepSpeed ranks and resumes exactly.

One run carries every method, each on its own projection of the tiny Llama, so one
ZeRO-2 launch covers them all; methods that declare other ZeRO stages run in their
own launch. Resuming from the middle checkpoint must repeat the losses step for step
(masks, accumulators, EMA statistics, seeds and optimizer state all restored), and
the exported run must keep the base model's text path.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import mmadapt
from mmadapt.adapters import ADAPTERS, Adapter, adapters_of
from mmadapt.adapters.base import AdapterStack
from tests.helpers import deepspeed_launcher, free_port, metrics, run_train, shapes_subset, tiny_overrides

pytestmark = pytest.mark.deepspeed_launch

HOOKS = ("gradient_hooks", "extra_loss", "before_step", "after_step", "stage_steps", "data_splits")
# Each method on its own projection, all in one ZeRO-2 run.
ZERO2_RUN = [
    {"type": "lora_sp", "targets": ["q_proj"], "r": 4, "alpha": 8},
    {"type": "periodic_lora", "targets": ["k_proj"], "r": 4, "alpha": 8, "stage_steps": 2},
    {"type": "prilora", "targets": ["v_proj"], "r": 4, "alpha": 8, "prune_every": 2, "prune_fraction": 0.25},
    {"type": "allora", "targets": ["o_proj"], "r": 8, "eta": 4.0},
    {"type": "bilora", "targets": ["gate_proj"], "r": 4, "alpha": 8},
    {"type": "trp", "targets": ["up_proj"], "r": 4, "alpha": 8, "energy": 0.9},
    {"type": "flora_opt", "targets": ["down_proj"], "r": 4, "kappa": 2},
]
# LoRA-Pro keeps full-space Adam moments per adapted matrix: ZeRO 0 only.
ZERO0_RUN = [{"type": "lora_pro", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}]
RUNS = {2: ZERO2_RUN, 0: ZERO0_RUN}
STEPS, MIDDLE = 6, 3


def _methods_with_hooks() -> set[str]:
    return {name for name, cls in ADAPTERS.items() if any(getattr(cls, h) is not getattr(Adapter, h) for h in HOOKS)}


def test_every_training_method_is_in_a_run():
    covered = {entry["type"] for run in RUNS.values() for entry in run}
    assert _methods_with_hooks() <= covered, _methods_with_hooks() - covered


def _train(data, out, stage: int, adapters: list[dict], *extra: str):
    entries = [{"modalities": ["image"], **entry} for entry in adapters]
    overrides = tiny_overrides(
        data, out, f"deepspeed.zero_stage={stage}", f"train.max_steps={STEPS}", f"train.save_every={MIDDLE}",
        "train.keep_last=3", "train.lr=5e-3", "train.warmup_steps=1", "train.weight_decay=0.1", f"adapters={yaml.safe_dump(entries, default_flow_style=True).strip()}",
        *extra,
    )
    result = run_train(overrides, launcher=deepspeed_launcher("--num_gpus", "2", "--master_port", free_port()))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


@pytest.mark.parametrize("stage", [s for s, run in RUNS.items() if run])
def test_methods_train_on_two_ranks_and_resume_exactly(tmp_path, stage):
    data = shapes_subset(tmp_path / "data")
    first = _train(data, tmp_path / "first", stage, RUNS[stage])
    assert list(first) == list(range(1, STEPS + 1))
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copy(tmp_path / "first" / "config.yaml", resumed_out / "config.yaml")
    middle = tmp_path / "first" / "checkpoints" / f"step-{MIDDLE}"
    resumed = _train(data, resumed_out, stage, RUNS[stage], f"train.resume={middle}")
    assert resumed == {step: loss for step, loss in first.items() if step > MIDDLE}

    trained = mmadapt.load_trained(tmp_path / "first")
    base = mmadapt.load_trained(tmp_path / "first")
    for module in base.modules():
        if isinstance(module, AdapterStack):
            module.clear()
    assert {a.spec.type for _, a in adapters_of(trained)} == {e["type"] for e in RUNS[stage]}
    text = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.equal(trained(text).logits, base(text).logits)
