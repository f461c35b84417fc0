"""LoRA-Pro's optimizer (arXiv 2407.18242; code mrflogs/LoRA-Pro): Adam on the full weight, stepped through A and B.

For a LoRA pair ``delta_W = s B A`` with gradients ``g_A = s B^T G``, ``g_B = s G A^T``
(G the full-weight gradient, never formed), the adjusted gradients

    g_A' = (B^T B)^-1 g_A / s^2 + X A
    g_B' = (I - P_B) g_B (A A^T)^-1 / s^2 - B X,        P_B = B (B^T B)^-1 B^T

make ``s (B g_A' + g_B' A) = P_B G + G P_A - P_B G P_A`` (``P_A = A^T (A A^T)^-1 A``), the
closest matrix to G that a change of A and B can produce, whatever the r x r matrix X.
Each step of :class:`LoRAPro`:

1. forms that equivalent gradient (X = 0, since X cancels there), out x in;
2. runs Adam on it in the full space (bias-corrected moments, out x in each), giving u;
3. treats u as a full-weight gradient (``s B^T u``, ``s u A^T``), adjusts again, now with the
   X solving ``(B^T B) X + X (A A^T) = -(B^T B)^-1 g_A A^T / s^2`` (the official choice);
4. takes a plain SGD step with the group's lr, after AdamW-style decoupled weight decay.

At the first step B = 0 makes B^T B singular, so (as the official code) ``g_A' = g_A`` and
``g_B' = g_B (A A^T)^-1 / s^2``. Inverses are ``pinv(M + 1e-8 I)`` in fp32 or wider.

A and B are paired by module through the model's adapters, each with its own scale s
(the official code pairs by parameter order and hard-codes s = 2). The pairs are found by
position in the param groups, so DeepSpeed's fp32 copies (ZeRO 0 with bf16) pair the same
way. Every other parameter takes an ordinary AdamW step from the base class, whose one
state dict also holds the full-space moments: ``state_dict``/``load_state_dict`` resume
exactly. Memory: two fp32 out x in tensors per adapted matrix, as heavy as full
fine-tuning's Adam state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import adapters_of
from ..errors import InputError
from . import check_args, register_optimizer
from .wrapper import OwnsSomeParameters

JITTER = 1e-8


def adjusted_gradients(
    A: torch.Tensor,
    B: torch.Tensor,
    grad_A: torch.Tensor,
    grad_B: torch.Tensor,
    scaling: float,
    first: bool,
    X: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's ``(g_A', g_B')`` for factors A (r, in), B (out, r) and their gradients.

    Args:
        first: the pair's first step (B = 0): the step-0 rule, X unused.
        X: the free r x r matrix; None solves the official Sylvester equation.

    Returns:
        Gradients of A's and B's shapes, in fp32 or the inputs' wider dtype.
    """
    A, B, grad_A, grad_B = (t.to(_work_dtype(A)) for t in (A, B, grad_A, grad_B))
    scale2 = scaling**2
    aa_inv = _inverse(A @ A.T)  # (r, r)
    if first:
        return grad_A, grad_B @ aa_inv / scale2
    bb = B.T @ B  # (r, r)
    bb_inv = _inverse(bb)
    if X is None:
        X = _solve_sylvester(bb, A @ A.T, -bb_inv @ grad_A @ A.T / scale2)
    X = X.to(A.dtype)
    hat_A = bb_inv @ grad_A / scale2 + X @ A
    right = grad_B @ aa_inv  # (out, r); (I - P_B) applied without forming an out x out matrix
    hat_B = (right - B @ (bb_inv @ (B.T @ right))) / scale2 - B @ X
    return hat_A, hat_B


def equivalent_gradient(
    A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, scaling: float, first: bool
) -> torch.Tensor:
    """``s (B g_A' + g_B' A)`` (out, in): the full-weight gradient the adjusted LoRA step follows."""
    r = A.shape[0]
    hat_A, hat_B = adjusted_gradients(A, B, grad_A, grad_B, scaling, first, X=A.new_zeros(r, r))
    return scaling * (B.to(hat_B.dtype) @ hat_A + hat_B @ A.to(hat_A.dtype))


class LoRAPro(OwnsSomeParameters):
    """AdamW whose LoRA-Pro pairs take the LoRA-Pro step instead (see the module docstring).

    Args:
        param_groups: the trainer's groups (``lr``, ``weight_decay`` per group).
        model: the model holding the ``lora_pro`` adapters whose A and B are in the groups.
        betas, eps: Adam's, for the full-space moments and the plain AdamW step alike.

    Raises:
        InputError: an adapter trains only one of its two factors.
    """

    def __init__(
        self, param_groups: list[dict], model: nn.Module, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__(param_groups, betas=tuple(betas), eps=eps, weight_decay=0.0)
        self.pairs = _pair_factors(self.param_groups, model)

    def _step_owned(self) -> list[torch.Tensor]:
        factors = []
        for pair in self.pairs:
            a, b = self._param(pair.a), self._param(pair.b)
            if a.grad is not None or b.grad is not None:
                self._step_pair(a, b, pair.scaling, self.param_groups[pair.a[0]])
            factors += [a, b]
        return factors

    def _param(self, where: tuple[int, int]) -> torch.Tensor:
        group, index = where
        return self.param_groups[group]["params"][index]

    def _step_pair(self, a: torch.Tensor, b: torch.Tensor, scaling: float, group: dict) -> None:
        state = self.state[a]
        work = _work_dtype(a)
        if not state:
            state["step"] = torch.tensor(0.0)  # a CPU float tensor, as AdamW's (its load_state_dict makes it one)
            state["full_exp_avg"] = torch.zeros(b.shape[0], a.shape[1], dtype=work, device=a.device)  # (out, in)
            state["full_exp_avg_sq"] = torch.zeros_like(state["full_exp_avg"])
        first = int(state["step"]) == 0
        A, B = a.to(work), b.to(work)
        grad_A = a.grad.to(work) if a.grad is not None else torch.zeros_like(A)
        grad_B = b.grad.to(work) if b.grad is not None else torch.zeros_like(B)
        full = equivalent_gradient(A, B, grad_A, grad_B, scaling, first)  # (out, in)
        direction = self._adam_direction(state, full, group)  # (out, in)
        hat_A, hat_B = adjusted_gradients(A, B, scaling * B.T @ direction, scaling * direction @ A.T, scaling, first)
        for param, grad in ((a, hat_A), (b, hat_B)):
            param.mul_(1 - group["lr"] * group["weight_decay"])
            param.add_(grad.to(param.dtype), alpha=-group["lr"])

    @staticmethod
    def _adam_direction(state: dict, full: torch.Tensor, group: dict) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step, exp_avg, exp_avg_sq = int(state["step"]), state["full_exp_avg"], state["full_exp_avg_sq"]
        exp_avg.lerp_(full, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(full, full, value=1 - beta2)
        denominator = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
        return exp_avg / (1 - beta1**step) / denominator


@dataclass(frozen=True)
class _Pair:
    a: tuple[int, int]  # (group, index) of lora_A.weight in the param groups
    b: tuple[int, int]
    scaling: float


def _pair_factors(groups: list[dict], model: nn.Module) -> list[_Pair]:
    where = {id(p): (g, i) for g, group in enumerate(groups) for i, p in enumerate(group["params"])}
    pairs = []
    for name, adapter in adapters_of(model):
        if adapter.optimizer != "lora_pro":
            continue
        a, b = where.get(id(adapter.lora_A.weight)), where.get(id(adapter.lora_B.weight))
        if a is None and b is None:  # its adapters are not trained in this run
            continue
        if a is None or b is None:
            raise InputError(f"lora_pro adapter {name}: A and B must train together (one of them is frozen)")
        pairs.append(_Pair(a, b, adapter.scaling))
    return pairs


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _inverse(matrix: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.pinv(matrix + JITTER * eye)


def _solve_sylvester(left: torch.Tensor, right: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with ``left X + X right = rhs`` for symmetric PSD r x r ``left`` and ``right``.

    In the eigenbases ``left = U diag(l) U^T``, ``right = V diag(m) V^T`` the equation is
    elementwise; the jitter keeps every ``l_i + m_j`` positive when both factors are singular.
    """
    eye = torch.eye(left.shape[0], dtype=left.dtype, device=left.device)
    lam, U = torch.linalg.eigh(left + JITTER * eye)
    mu, V = torch.linalg.eigh(right + JITTER * eye)
    return U @ ((U.T @ rhs @ V) / (lam[:, None] + mu[None, :])) @ V.T


@register_optimizer("lora_pro", zero_stages=(0,))
def lora_pro(param_groups: list[dict], model: nn.Module, args: dict) -> torch.optim.Optimizer:
    check_args("lora_pro", args, LoRAPro)
    return LoRAPro(param_groups, model, **args)
