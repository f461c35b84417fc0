"""LoRAPrune (arXiv 2305.18403; code aim-uofa/LoRAPrune): structured pruning guided by LoRA gradients.

A short LoRA fine-tune on calibration text ranks structured groups of the base weights
without ever forming the base weights' gradients:

- gradient estimate from the LoRA grads only (the official code's form, no scale
  factor): ``Ĝ = G_B A + B G_A − G_B G_A`` (out x in);
- element importance ``|Ĝ ⊙ (W0 + s·B A)|``, summed per group, L2-normalised per
  module, summed over the group's modules, then ``Ī ← 0.9·Ī + 0.1·I`` every step;
- groups, per decoder layer: MLP channels (a gate_proj row, an up_proj row and a
  down_proj column) and GQA groups (one key/value head with the query heads that read
  it: q/k/v rows and o_proj columns), so a pruned layer keeps HF's
  ``num_key_value_groups`` and its ``view(..., -1, head_dim)`` reshapes stay valid;
- a cubic schedule raises the pruned fraction from ``init_ratio`` to ``ratio`` between
  a warm-up and a cool-down fraction of the steps; every ``prune_freq`` steps each
  layer's lowest-Ī groups still alive are masked until the layer reaches the fraction
  (local, per layer and group kind, as in the official code). The first 10 % of the
  layers (rounded down) and the last layer are never pruned; a layer keeps at least
  one group of each kind;
- the mask multiplies the outputs of q/k/v and gate/up, so masked outputs are exactly
  zero and a masked group adds nothing downstream.

The official code prunes only while the scheduled fraction is still below the target;
here one last event after training brings every layer to the target. The trained LoRA
is then merged into the base weights (it was trained to make up for what the masks
removed) and the masked rows and columns are cut out, leaving a smaller dense model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from ..adapters import adapter_parameters, inject, merge
from ..adapters.inject import STACK_ATTR
from ..adapters.lora import LoRA
from ..errors import InputError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
FROZEN_LAYER_FRACTION = 0.1
EMA_DECAY = 0.9
MAX_GRAD_NORM = 1.0  # the official trainer clips (HF's default) before it reads the grads
ADAPTER_NAME = "loraprune"


@dataclass(frozen=True)
class PruneSettings:
    """LoRAPrune's knobs; the defaults are the official code's, except the step count."""

    ratio: float = 0.5  # fraction of each prunable layer's groups removed at the end
    init_ratio: float = 0.0  # scheduled fraction before warm-up ends
    warmup: float = 0.1  # fraction of the steps before pruning starts
    cooldown: float = 0.1  # fraction of the steps at the target fraction
    prune_freq: int = 10  # steps between pruning events
    steps: int = 40
    lr: float = 1e-4
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05


@dataclass(frozen=True)
class Member:
    """One linear module of a group set, its groups laid out as contiguous blocks."""

    name: str  # full module name in the model
    block: int  # rows (fan_in: columns) per group
    fan_in: bool  # groups index the input columns (o_proj, down_proj), not the output rows


@dataclass
class GroupSet:
    """The groups of one kind (``attention`` or ``mlp``) in one decoder layer."""

    layer: int
    kind: str
    members: list[Member]
    mask: torch.Tensor  # (groups,) 1.0 alive, 0.0 pruned
    importance: torch.Tensor  # (groups,) EMA of the LoRA-guided importance

    @property
    def pruned(self) -> int:
        return int((self.mask == 0).sum())


def cubic_sparsity(step: int, total: int, init_ratio: float, ratio: float, warmup: float, cooldown: float) -> float:
    """The scheduled pruned fraction at optimizer step ``step`` (0-based) of ``total``.

    ``init_ratio`` up to ``warmup·total``, ``ratio`` after ``total − cooldown·total``, and in
    between ``ratio + (init_ratio − ratio)·(1 − p)³`` with
    ``p = (step − warmup·total) / (total − (warmup + cooldown)·total)``.
    """
    if step <= warmup * total:
        return init_ratio
    if step > total - cooldown * total:
        return ratio
    progress = (step - warmup * total) / (total - (warmup + cooldown) * total)
    return ratio + (init_ratio - ratio) * (1 - progress) ** 3


def group_sets(model: PreTrainedModel) -> list[GroupSet]:
    """The attention and MLP group sets of every prunable decoder layer of ``model``.

    Raises:
        InputError: the decoder layers are not Llama-style, or none is prunable.
    """
    prefix, layers = _decoder_layers(model)
    first = int(len(layers) * FROZEN_LAYER_FRACTION)
    sets = []
    for index in range(first, len(layers) - 1):
        name = f"{prefix}.{index}"
        sets += [_attention_set(layers[index], name, index), _mlp_set(layers[index], name, index)]
    if not sets:
        raise InputError(
            f"prune: the model has {len(layers)} decoder layers; the first 10% and the last are never pruned, "
            "which leaves none"
        )
    return sets


def _decoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    layers = getattr(model.get_decoder(), "layers", None)
    names = [name for name, module in model.named_modules() if module is layers]
    if not isinstance(layers, nn.ModuleList) or not names:
        raise InputError(f"prune: {type(model).__name__} has no list of decoder layers (model.layers) to prune")
    return names[0], layers


def _attention_set(layer: nn.Module, prefix: str, index: int) -> GroupSet:
    attention = _llama_part(layer, "self_attn", ATTENTION, prefix)
    head_dim, per_group = getattr(attention, "head_dim", None), getattr(attention, "num_key_value_groups", None)
    if not head_dim or not per_group:
        raise InputError(f"prune: {prefix}.self_attn has no head_dim / num_key_value_groups (not Llama-style)")
    groups = attention.k_proj.out_features // head_dim  # key/value heads
    blocks = {"q_proj": per_group * head_dim, "k_proj": head_dim, "v_proj": head_dim, "o_proj": per_group * head_dim}
    members = [Member(f"{prefix}.self_attn.{n}", blocks[n], fan_in=n == "o_proj") for n in ATTENTION]
    return GroupSet(index, "attention", members, torch.ones(groups), torch.zeros(groups))


def _mlp_set(layer: nn.Module, prefix: str, index: int) -> GroupSet:
    mlp = _llama_part(layer, "mlp", MLP, prefix)
    channels = mlp.gate_proj.out_features
    members = [Member(f"{prefix}.mlp.{n}", 1, fan_in=n == "down_proj") for n in MLP]
    return GroupSet(index, "mlp", members, torch.ones(channels), torch.zeros(channels))


def _llama_part(layer: nn.Module, part: str, names: tuple[str, ...], prefix: str) -> nn.Module:
    module = getattr(layer, part, None)
    if module is None or not all(type(getattr(module, n, None)) is nn.Linear for n in names):
        raise InputError(
            f"prune: {prefix}.{part} lacks the linear layers {list(names)}; LoRAPrune needs Llama-style decoder layers"
        )
    return module


def lora_gradient_estimate(
    lora_a: torch.Tensor, lora_b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor
) -> torch.Tensor:
    """``Ĝ = G_B A + B G_A − G_B G_A`` (out x in), the base weight's gradient estimated from LoRA's."""
    return grad_b @ lora_a + lora_b @ grad_a - grad_b @ grad_a


@torch.no_grad()
def element_importance(layer: nn.Linear, lora: LoRA) -> torch.Tensor:
    """``|Ĝ ⊙ (W0 + s·B A)|`` (out x in) from the LoRA grads of the last backward."""
    a, b = lora.lora_A.weight, lora.lora_B.weight
    estimate = lora_gradient_estimate(a, b, a.grad, b.grad)
    return (estimate * (layer.weight + lora.scaling * b @ a)).abs()


def group_importance(element: torch.Tensor, member: Member) -> torch.Tensor:
    """Element importance summed per group of ``member``, L2-normalised: (groups,)."""
    per_unit = element.sum(dim=0 if member.fan_in else 1)  # (in,) columns or (out,) rows
    groups = per_unit.view(-1, member.block).sum(dim=1)
    return groups / (groups.norm() + 1e-8)


def update_importance(model: nn.Module, sets: list[GroupSet]) -> None:
    """One EMA step of every group set's importance from the current LoRA grads."""
    for group_set in sets:
        current = sum(
            group_importance(element_importance(*_lora_of(model, member.name)), member)
            for member in group_set.members
        )
        group_set.importance.mul_(EMA_DECAY).add_(current, alpha=1 - EMA_DECAY)


def _lora_of(model: nn.Module, name: str) -> tuple[nn.Linear, LoRA]:
    layer = model.get_submodule(name)
    return layer, getattr(layer, STACK_ATTR)[ADAPTER_NAME]


def prune_to(group_set: GroupSet, ratio: float) -> None:
    """Mask the lowest-importance live groups until ``int(groups · ratio)`` are pruned (never all)."""
    size = group_set.mask.numel()
    missing = min(int(size * ratio), size - 1) - group_set.pruned
    if missing <= 0:
        return
    alive = group_set.mask.nonzero().squeeze(1)
    weakest = alive[group_set.importance[alive].argsort(stable=True)[:missing]]
    group_set.mask[weakest] = 0.0


def mask_outputs(model: nn.Module, sets: list[GroupSet]) -> list:
    """Multiply the outputs of each set's row members by its mask (after any adapter's delta).

    Returns:
        The hook handles.
    """
    return [
        model.get_submodule(member.name).register_forward_hook(partial(_masked, group_set.mask, member.block))
        for group_set in sets
        for member in group_set.members
        if not member.fan_in
    ]


def _masked(mask: torch.Tensor, block: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * mask.repeat_interleave(block).to(output.dtype)  # (..., out) * (out,)


def train_masks(
    model: PreTrainedModel, batches: list[torch.Tensor], settings: PruneSettings
) -> tuple[list[GroupSet], list[dict]]:
    """Train a LoRA on ``batches`` while scoring and masking groups, in place.

    ``model`` ends with the LoRA injected (unmerged) and the masks applied, at the target ratio.

    Returns:
        The group sets, and one history row per pruning event: ``step``, ``ratio`` and
        ``pruned`` (``"<layer>.<kind>"`` -> pruned group count).
    """
    sets = group_sets(model)
    for param in model.parameters():
        param.requires_grad_(False)
    spec = {
        "type": "lora", "name": ADAPTER_NAME, "modalities": ["text"], "targets": [*ATTENTION, *MLP],
        "r": settings.r, "alpha": settings.alpha, "dropout": settings.dropout,
    }
    inject(model, [spec])
    mask_outputs(model, sets)  # registered after inject, so masks act on base + LoRA
    params = list(adapter_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    model.train()
    history = []
    bar = tqdm(range(settings.steps), desc="loraprune", dynamic_ncols=True)
    for step in bar:
        batch = batches[step % len(batches)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        update_importance(model, sets)
        # Score, then prune on the schedule, before the optimizer step (as the official trainer).
        ratio = cubic_sparsity(
            step, settings.steps, settings.init_ratio, settings.ratio, settings.warmup, settings.cooldown
        )
        if step % settings.prune_freq == 0 and ratio > settings.init_ratio:
            history.append(_prune_event(sets, step, ratio))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", pruned=f"{ratio:.2f}")
    history.append(_prune_event(sets, settings.steps, settings.ratio))
    return sets, history


def _prune_event(sets: list[GroupSet], step: int, ratio: float) -> dict:
    for group_set in sets:
        prune_to(group_set, ratio)
    return {"step": step, "ratio": ratio, "pruned": {f"{s.layer}.{s.kind}": s.pruned for s in sets}}


@torch.no_grad()
def cut_pruned(model: nn.Module, sets: list[GroupSet]) -> dict[str, nn.Linear]:
    """Replace each member by a smaller ``nn.Linear`` without its masked rows or columns.

    Returns:
        The new modules by name.
    """
    replaced = {}
    for group_set in sets:
        kept = group_set.mask.bool()
        for member in group_set.members:
            old = model.get_submodule(member.name)
            index = kept.repeat_interleave(member.block)
            weight = old.weight[:, index] if member.fan_in else old.weight[index]  # (out', in')
            bias = None if old.bias is None else old.bias if member.fan_in else old.bias[index]
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
            model.set_submodule(member.name, new.train(old.training))
            replaced[member.name] = new
    return replaced


def lora_prune(
    model: PreTrainedModel, batches: list[torch.Tensor], settings: PruneSettings
) -> tuple[dict[str, nn.Linear], list[dict]]:
    """Prune ``model`` in place: train masks on a copy, merge its LoRA back, cut the masked groups.

    Returns:
        The replaced modules by name, and the pruning history of :func:`train_masks`.
    """
    work = copy.deepcopy(model)  # carries the LoRA and the hooks, so ``model`` stays a plain HF model
    sets, history = train_masks(work, batches, settings)
    merge(work)
    copy_adapted_weights(work, model)
    return cut_pruned(model, sets), history


@torch.no_grad()
def copy_adapted_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy the (merged) weight of every adapted linear layer of ``source`` into ``target``."""
    for name, layer in source.named_modules():
        if isinstance(layer, nn.Linear) and hasattr(layer, STACK_ATTR):
            target.get_submodule(name).weight.copy_(layer.weight)
