"""A small in-process training loop that calls the training hooks exactly as the trainer does.

Method tests use it to train a tiny LM with AdamW (ZeRO 0 semantics) and then check
the method's defining property; the DeepSpeed paths are covered end to end in
``tests/test_training_methods_e2e.py``.
"""

from __future__ import annotations


import torch
from torch import nn

from mmadapt.adapters import adapter_parameters, inject, modality_ids
from mmadapt.hooks import StepContext, TrainingHooks, gradient_hooks
from mmadapt.modality import IMAGE, TEXT
from mmadapt.optim import build_optimizer
from tests.conftest import tiny_causal_lm

VOCAB = 97


def adapted_lm(spec: dict, seed: int = 0) -> nn.Module:
    """The tiny Llama of the adapter battery with ``spec`` injected, in train mode."""
    model = tiny_causal_lm("llama", seed=seed)
    torch.manual_seed(seed + 1)
    inject(model, [spec])
    return model.train()


def batch(step: int, micro: int = 0, size: int = 4, length: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed synthetic batch: tokens, modality ids (image rows in the middle), next-token targets."""
    generator = torch.Generator().manual_seed(1000 * step + micro)
    tokens = torch.randint(0, VOCAB, (size, length + 1), generator=generator)
    modality = torch.full((size, length), TEXT)
    modality[:, 2:7] = IMAGE
    return tokens[:, :-1], modality, tokens[:, 1:]


def train(
    model: nn.Module,
    steps: int,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    grad_accum: int = 1,
    on_step=None,
    optimizer_name: str = "adamw",
    optimizer_args: dict | None = None,
    first_step: int = 0,
    optimizer_state: dict | None = None,
) -> list[float]:
    """Train the adapter parameters of ``model``; returns the loss of each step.

    ``on_step(ctx)``, when given, runs after each step's hooks (tests record state there).
    ``optimizer_name`` picks a registered optimizer (``mmadapt.optim``), built with
    ``optimizer_args`` as the trainer builds it under ZeRO 0. A resumed run starts at
    ``first_step`` with the optimizer's saved ``optimizer_state`` (the model's state loaded
    by the caller); it trains steps ``first_step .. steps - 1``.
    """
    params = adapter_parameters(model)
    matrices = [p for p in params.values() if p.dim() >= 2]
    vectors = [p for p in params.values() if p.dim() < 2]
    groups = [
        {"params": matrices, "lr": lr, "weight_decay": weight_decay},
        {"params": vectors, "lr": lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = build_optimizer(optimizer_name, groups, model, optimizer_args or {}, zero_stage=0)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    hooks = TrainingHooks(model)
    losses = []
    with gradient_hooks(hooks):
        for step in range(first_step, steps):
            ctx = hooks.context(step, optimizer)
            total = 0.0
            for micro in range(grad_accum):
                loss = step_loss(model, ctx, micro) / grad_accum
                loss.backward()
                total += loss.item()
            hooks.before_step(ctx)
            optimizer.step()
            optimizer.zero_grad()
            hooks.after_step(ctx)
            if on_step is not None:
                on_step(ctx)
            losses.append(total)
    return losses


def one_process_engine(model: nn.Module, optimizer_name: str, stage: int, bf16: bool = False, lr: float = 1e-2):
    """A one-process DeepSpeed engine (CPU, gloo) training the adapter parameters of ``model``
    with a registered optimizer, as the trainer configures it; returns the engine."""
    import deepspeed

    from mmadapt import distributed

    distributed.init(threads=torch.get_num_threads())  # the single-process environment train.py sets
    trained = adapter_parameters(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    groups = [{"params": list(trained.values()), "lr": lr, "weight_decay": 0.0}]
    config = {
        "train_micro_batch_size_per_gpu": 1, "train_batch_size": distributed.world_size(),
        "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9,
    }
    optimizer = build_optimizer(optimizer_name, groups, model, {}, zero_stage=stage)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def step_loss(model: nn.Module, ctx: StepContext, micro: int = 0) -> torch.Tensor:
    """Next-token loss of the step's batch (the split's batch when the method splits data) plus regularisers."""
    offset = {None: 0, **{name: 100 * (i + 1) for i, name in enumerate(sorted(_splits(model)))}}[ctx.split]
    tokens, modality, targets = batch(ctx.step + offset, micro)
    with modality_ids(model, modality):
        logits = model(tokens).logits
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    extra = TrainingHooks(model).extra_loss(ctx)
    return loss if extra is None else loss + extra


def text_logits(model: nn.Module) -> torch.Tensor:
    """Logits of a text-only batch (no modality context: every row is text)."""
    tokens, _, _ = batch(999)
    with torch.no_grad():
        return model(tokens).logits


def _splits(model: nn.Module) -> dict[str, float]:
    return TrainingHooks(model).data_splits() or {}
