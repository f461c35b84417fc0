"""Modality ids and the per-forward modality context that adapters read.

Adapters sit inside ``nn.Linear`` layers of an unmodified Hugging Face model, so
they cannot take a mask argument. Instead every injected model owns one
:class:`ModalityContext`; ``modality_ids(model, ids)`` swaps its immutable
:class:`ModalityState` for the duration of a forward, and adapters read the
state's cached row indices.

Gradient checkpointing recomputes a decoder layer during ``backward()``, possibly
after the ``modality_ids`` block has exited and another forward (the no-grad
teacher pass, say) has set different ids. transformers runs each checkpointed
layer through ``layer._gradient_checkpointing_func(fn, *args)``; the context wraps
that function so ``fn`` runs under the state captured when the layer first ran,
both at forward and at recompute, for reentrant and non-reentrant checkpointing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

TEXT, IMAGE, SPEECH = 0, 1, 2
MODALITIES = {"text": TEXT, "image": IMAGE, "speech": SPEECH}
_CONTEXT_ATTR = "_mmadapt_context"


def modality_index(name: str) -> int:
    """Return the integer id of a modality name (``text``, ``image``, ``speech``)."""
    if name not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; choose from {sorted(MODALITIES)}")
    return MODALITIES[name]


@dataclass(frozen=True)
class ModalityState:
    """What adapters see during one forward: token modalities and the disable flag.

    ``ids`` is ``LongTensor[B, T]`` or None (every token is text); ``examples`` is
    ``LongTensor[B]``, each example's adapter index for per-example adapters, or None.
    """

    ids: torch.Tensor | None = None
    disabled: bool = False
    examples: torch.Tensor | None = None
    _rows: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def rows(self, modalities: frozenset[int], batch_shape: torch.Size) -> torch.Tensor | None:
        """Flat row indices (into ``x.reshape(-1, d)``) of tokens in ``modalities``.

        Returns None when no row is selected, so callers can return the base
        output untouched (bit-identical text path).
        """
        if self.disabled:
            return None
        if self.ids is None:
            return self._text_rows(modalities, batch_shape)
        if tuple(batch_shape) != tuple(self.ids.shape):
            raise RuntimeError(
                f"modality ids have shape {tuple(self.ids.shape)} but the layer input has "
                f"leading shape {tuple(batch_shape)}; set modality_ids for this exact input"
            )
        if modalities not in self._rows:
            selected = torch.zeros_like(self.ids, dtype=torch.bool)
            for modality in modalities:
                selected |= self.ids == modality
            rows = selected.flatten().nonzero().squeeze(1)
            self._rows[modalities] = rows if rows.numel() else None
        return self._rows[modalities]

    def _text_rows(self, modalities: frozenset[int], batch_shape: torch.Size) -> torch.Tensor | None:
        if TEXT not in modalities:
            return None
        key = (modalities, tuple(batch_shape))
        if key not in self._rows:
            self._rows[key] = torch.arange(batch_shape.numel())
        return self._rows[key]


class ModalityContext:
    """The one mutable holder of a model's current :class:`ModalityState`."""

    def __init__(self) -> None:
        self.state = ModalityState()

    @contextlib.contextmanager
    def using(self, state: ModalityState) -> Iterator[ModalityState]:
        previous, self.state = self.state, state
        try:
            yield state
        finally:
            self.state = previous

    def rows(self, modalities: frozenset[int], x: torch.Tensor) -> torch.Tensor | None:
        rows = self.state.rows(modalities, x.shape[:-1])
        return None if rows is None else rows.to(x.device)

    def row_examples(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The example index of each selected row of ``x`` (``[B, T, d]`` or ``[B, d]``)."""
        examples = self.state.examples
        if examples is None:
            raise RuntimeError("a per-example adapter needs example_adapters(model, index) around the forward")
        if examples.shape != x.shape[:1]:
            raise RuntimeError(f"example_adapters got {examples.shape[0]} indices for a batch of {x.shape[0]}")
        tokens_per_example = x[0].numel() // x.shape[-1]
        return examples.to(x.device)[rows // tokens_per_example]

    def guard_checkpointing(self, root: nn.Module) -> None:
        """Make every checkpointed layer under ``root`` recompute with its forward-time state."""
        for module in root.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None and not getattr(func, "_mmadapt_guarded", False):
                module._gradient_checkpointing_func = self._guarded(func)

    def _guarded(self, checkpoint_func):
        @functools.wraps(checkpoint_func)
        def checkpoint_with_state(fn, *args, **kwargs):
            captured = self.state

            def run_under_captured_state(*fn_args, **fn_kwargs):
                with self.using(captured):
                    return fn(*fn_args, **fn_kwargs)

            return checkpoint_func(run_under_captured_state, *args, **kwargs)

        checkpoint_with_state._mmadapt_guarded = True
        return checkpoint_with_state


def attach_context(model: nn.Module) -> ModalityContext:
    """Return ``model``'s context, creating it and its checkpoint guard on first use."""
    context = getattr(model, _CONTEXT_ATTR, None)
    if context is None:
        context = ModalityContext()
        object.__setattr__(model, _CONTEXT_ATTR, context)
        # Runs before any layer, so layers checkpointed later in this forward are guarded;
        # also on the bare decoder, which MultimodalLM calls to skip unneeded logits.
        for entry in {model, getattr(model, "base_model", model)}:
            entry.register_forward_pre_hook(lambda module, args: context.guard_checkpointing(module))
    return context


def context_of(model: nn.Module) -> ModalityContext:
    """Find the modality context of an injected HF model or of a ``MultimodalLM``."""
    for candidate in _owners(model):
        context = getattr(candidate, _CONTEXT_ATTR, None)
        if context is not None:
            return context
    raise ValueError("this model has no mmadapt adapters; call mmadapt.adapters.inject() first")


def _owners(model: nn.Module) -> Iterable[nn.Module]:
    yield model
    llm = getattr(model, "llm", None)
    if isinstance(llm, nn.Module):
        yield llm


@contextlib.contextmanager
def modality_ids(model: nn.Module, ids: torch.Tensor | None) -> Iterator[None]:
    """Within the block, adapters of ``model`` see ``ids`` (``LongTensor[B, T]``).

    Outside any such block every token counts as text. Nested blocks restore the
    outer ids on exit.
    """
    context = context_of(model)
    with context.using(replace(context.state, ids=ids)):
        yield


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the base LM: every adapter is skipped inside the block."""
    context = context_of(model)
    with context.using(replace(context.state, disabled=True)):
        yield


@contextlib.contextmanager
def example_adapters(model: nn.Module, index: torch.Tensor) -> Iterator[None]:
    """Within the block, example ``b`` of a batch uses adapter ``index[b]`` of every
    per-example adapter (``flora_batched``); ``index`` is ``LongTensor[B]``."""
    context = context_of(model)
    with context.using(replace(context.state, examples=index)):
        yield
