"""The shape of a method's optimizer: it steps the parameters it owns, AdamW steps the rest.

Subclassing AdamW keeps one ``state`` and one ``state_dict`` for both kinds of parameter, so
a checkpoint resumes exactly, the trainer's param groups (and the LR schedule on them) stay
as given, and hooks that edit Adam moments (``StepContext.reset_optimizer_state``, Flora's
moment transfer) find every parameter's state in the same place.
"""

from __future__ import annotations

import torch


class OwnsSomeParameters(torch.optim.AdamW):
    """AdamW for every parameter except those :meth:`_step_owned` updates itself."""

    def _step_owned(self) -> list[torch.Tensor]:
        """Update the owned parameters that have a gradient; return every owned parameter."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owned = self._step_owned()
        # AdamW skips parameters without a gradient: hide the owned ones' for its step.
        grads = [p.grad for p in owned]
        for param in owned:
            param.grad = None
        super().step()
        for param, grad in zip(owned, grads):
            param.grad = grad
        return loss
