"""DoRA (Liu et al. 2024, arXiv 2402.09353): LoRA with a learned magnitude per output row.

The adapted weight is ``W' = diag(m / ||V||) V`` with ``V = W0 + s * B A`` and
``||V||`` the L2 norm of each output row. The delta on the adapter's rows uses PEFT's
efficient form (``DoraLinearLayer``), so exported adapters give PEFT's logits:

    delta = (m / ||V|| - 1) * (x' W0^T) + (m / ||V||) * s * B A x',   x' = dropout(x)

The bias is not rescaled (PEFT subtracts it from the base output before scaling).
``m`` starts at ``||W0||``, so the adapter starts at the base model up to rounding.
``||V||`` is a constant in backward unless ``dora_grad_through_norm`` (the paper's
section 4.3 and PEFT both detach it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .lora import LoRA, LoRASpec
from .registry import register_adapter


class DoRASpec(LoRASpec):
    dora_grad_through_norm: bool = Field(
        False, description="let gradients flow through the row norm ||W0 + s*B*A|| (PEFT and the paper detach it)"
    )


@register_adapter("dora")
class DoRA(LoRA):
    spec_class = DoRASpec
    exclusive = True  # it rescales every output of its rows, so another adapter's delta there would be rescaled too

    def __init__(self, base: nn.Module, spec: DoRASpec) -> None:
        super().__init__(base, spec)
        row_norm = torch.linalg.norm(base.weight.detach().float(), dim=1)  # (out,)
        self.magnitude = nn.Parameter(row_norm.to(base.weight.dtype))
        # The norm ||V|| at merge time; unmerge divides by m / ||V|| with exactly that value.
        self.register_buffer("merged_norm", None, persistent=False)

    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s * B A||`` per output row, (out,); detached unless ``dora_grad_through_norm``."""
        lora_weight = self.lora_B.weight @ self.lora_A.weight  # (out, in)
        if not self.spec.dora_grad_through_norm:
            lora_weight = lora_weight.detach()
        norm = torch.linalg.norm(self.base_layer.weight + self.scaling * lora_weight, dim=1)
        return norm if self.spec.dora_grad_through_norm else norm.detach()

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        x = self.dropout(x_rows)
        scale = self.magnitude / self.weight_norm()  # (out,)
        base_rows = F.linear(x, self.base_layer.weight)  # (N, out), without bias
        return (scale - 1) * base_rows + scale * self.lora_B(self.lora_A(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``W' - W0`` (valid while unmerged)."""
        weight = self.base_layer.weight
        scale = (self.magnitude / self.weight_norm()).unsqueeze(1)  # (out, 1)
        return scale * (weight + super().delta_weight()) - weight

    @torch.no_grad()
    def merge(self) -> None:
        """``W0 <- (m / ||V||) V``, keeping ``||V||`` for :meth:`unmerge`."""
        self._check_merged(False)
        weight = self.base_layer.weight
        norm = self.weight_norm()
        scale = (self.magnitude / norm).unsqueeze(1)  # (out, 1)
        weight.copy_(scale * (weight + super().delta_weight()))
        self.merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W0 = W' ||V|| / m - s B A`` with the norm cached at merge."""
        self._check_merged(True)
        weight = self.base_layer.weight
        scale = (self.magnitude / self.merged_norm).unsqueeze(1)  # (out, 1)
        weight.copy_(weight / scale - super().delta_weight())
        self.merged_norm = None
        self.merged = False
