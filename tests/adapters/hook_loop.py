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
) -> list[float]:
    """Train the adapter parameters of ``model``; returns the loss of each step.

    ``on_step(ctx)``, when given, runs after each step's hooks (tests record state there).
    """
    params = adapter_parameters(model)
    matrices = [p for p in params.values() if p.dim() >= 2]
    vectors = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    hooks = TrainingHooks(model)
    losses = []
    with gradient_hooks(hooks):
        for step in range(steps):
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
