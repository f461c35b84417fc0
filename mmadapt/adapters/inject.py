"""Put adapters into any Hugging Face model by module-name patterns."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import InputError
from ..modality import MODALITIES, attach_context
from .base import CONV_LAYERS, Adapter, AdapterSpec, AdapterStack, apply_stack_hook
from .registry import adapter_class, parse_spec

STACK_ATTR = "mmadapt"


def matches(module_name: str, target: str) -> bool:
    """``target`` names a module suffix (``q_proj``) or, as ``re:<regex>``, the full name."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], module_name) is not None
    return module_name == target or module_name.endswith("." + target)


def inject(model: nn.Module, adapters: list[dict | AdapterSpec]) -> dict[str, list[str]]:
    """Add adapters to the linear layers of ``model`` (an unmodified HF model), and to its
    conv layers for variants that adapt convs (``flora_tucker``).

    Args:
        model: any ``nn.Module``; usually an ``AutoModelForCausalLM``.
        adapters: config entries such as ``{"type": "plora", "modalities": ["image"],
            "targets": ["q_proj"], "r": 8, "alpha": 16}``.

    Returns:
        For each adapter key, the names of the modules it was added to.

    Raises:
        InputError: an entry is invalid, its targets match no linear layer, or an
            exclusive adapter (DoRA) would share rows with another adapter.
    """
    context = attach_context(model)
    # Listed once, before any adapter adds its own linear layers to the model.
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, *CONV_LAYERS)) and name}
    placed: dict[str, list[str]] = {}
    for index, entry in enumerate(adapters):
        spec = entry if isinstance(entry, AdapterSpec) else parse_spec(entry)
        variant = adapter_class(spec.type)
        kinds = (nn.Linear, *CONV_LAYERS) if variant.adapts_conv() else nn.Linear
        adaptable = [name for name, layer in layers.items() if isinstance(layer, kinds)]
        names = [name for name in adaptable if any(matches(name, t) for t in spec.targets)]
        if not names:
            what = "linear or conv layer" if variant.adapts_conv() else "linear layer"
            raise InputError(
                f"adapters.{index} ({spec.type}): targets {spec.targets} match no {what} "
                f"of {type(model).__name__} (its {what}s are named like: {', '.join(adaptable[:4])})"
            )
        key = _unique_key(spec, placed)
        for name in names:
            stack = _stack_of(layers[name], context)
            adapter = variant(layers[name], variant.layer_spec(spec, name, names))
            adapter.train(layers[name].training)  # an adapter added to an eval() model runs without dropout
            _check_overlap(f"adapters.{index} ({key})", adapter, stack, name)
            stack[key] = adapter
        placed[key] = names
    return placed


def _check_overlap(entry: str, adapter: Adapter, stack: AdapterStack, layer_name: str) -> None:
    """An exclusive adapter (one that renormalises the weight) shares its rows with no other."""
    for other_key, other in stack.items():
        shared = adapter.modalities & other.modalities
        if shared and (adapter.exclusive or other.exclusive):
            which = adapter.spec.type if adapter.exclusive else other.spec.type
            names = sorted(n for n, i in MODALITIES.items() if i in shared)
            raise InputError(
                f"{entry} and adapter {other_key!r} both fire on {names} rows of {layer_name}, but "
                f"{which} rescales the whole weight of its rows and cannot stack with another adapter there; "
                "give them different modalities or targets"
            )


def _unique_key(spec: AdapterSpec, placed: dict) -> str:
    key = spec.name or spec.type
    if spec.name and key in placed:
        raise InputError(f"two adapters are named {key!r}")
    suffix = 1
    while key in placed:
        suffix += 1
        key = f"{spec.type}_{suffix}"
    return key


def _stack_of(layer: nn.Module, context) -> AdapterStack:
    stack = getattr(layer, STACK_ATTR, None)
    if stack is None:
        stack = AdapterStack(context)
        layer.add_module(STACK_ATTR, stack)
        layer.register_forward_hook(apply_stack_hook)
    return stack


def adapters_of(model: nn.Module) -> Iterator[tuple[str, Adapter]]:
    """Every adapter in ``model`` with its full module name."""
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            yield name, module


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of every adapter in ``model``, by full name."""
    return {
        f"{name}.{param_name}": param
        for name, adapter in adapters_of(model)
        for param_name, param in adapter.named_parameters()
    }


@contextlib.contextmanager
def no_adapter_grads(model: nn.Module) -> Iterator[None]:
    """Temporarily freeze adapter parameters (e.g. to compare against the base model)."""
    params = list(adapter_parameters(model).values())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def count_parameters(params: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())
