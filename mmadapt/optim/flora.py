"""Flora's optimizer (arXiv 2402.03293; code BorealisAI/flora-opt): Adafactor with randomly compressed momentum.

For full weights (trained ``projector``/``llm``/encoder parameters). A matrix G (m x n)
is compressed on its short side with a seeded Gaussian projection P ~ N(0, 1/r),
regenerated from its seed and never stored:

    m < n:  c = P G,  P (r, m),  decompress P^T c        m >= n:  c = G P,  P (n, r),  decompress c P^T

``E[P^T P] = I``, so decompress(compress(G)) is G in expectation. The momentum of an
eligible matrix is kept compressed (r x n or m x r instead of m x n); every ``kappa``
steps it moves to a fresh seed, ``c <- compress_new(decompress_old(c))``. The rest is
flora-opt's Adafactor: factored row/column second moments for matrices (full for the
others), ``beta2_t = 1 - t^decay_rate``, update clipping by RMS, and the step scaled by
the parameter's RMS (``scale_parameter``), so ``train.lr`` is a relative step size.

Compressed: 2-D, ``rank <= min(m, n)``, aspect ratio at most 4, not an ``nn.Embedding``
weight. Every other parameter keeps an uncompressed momentum. Adapter parameters take a
plain AdamW step from the base class (one state dict for both, so resume is exact).
flora-opt also compresses gradient accumulation; that is left out: DeepSpeed accumulates
and reduces gradients before the optimizer sees them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import adapter_parameters
from ..errors import InputError
from . import check_args, register_optimizer
from .wrapper import OwnsSomeParameters

MAX_ASPECT = 4  # flora-opt: wider matrices (embeddings, LM heads) keep an uncompressed momentum


def projection(shape: tuple[int, int], rank: int, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The projection of a (m, n) matrix: (rank, m) if m < n else (n, rank), N(0, 1/rank), from ``seed``."""
    m, n = shape
    generator = torch.Generator(device=device).manual_seed(seed)
    size = (rank, m) if m < n else (n, rank)
    return torch.randn(size, generator=generator, device=device, dtype=dtype) / math.sqrt(rank)


def compress(matrix: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """``P G`` (rank, n) or ``G P`` (m, rank), on the short side of G."""
    P = projection(matrix.shape, rank, seed, matrix.device, matrix.dtype)
    return P @ matrix if matrix.shape[0] < matrix.shape[1] else matrix @ P


def decompress(compressed: torch.Tensor, shape: tuple[int, int], rank: int, seed: int) -> torch.Tensor:
    """Back to ``shape``: ``P^T c`` or ``c P^T`` with the projection of ``seed``."""
    P = projection(shape, rank, seed, compressed.device, compressed.dtype)
    return P.T @ compressed if shape[0] < shape[1] else compressed @ P.T


def next_seed(seed: int) -> int:
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def compressed_momentum(
    state: dict, update: torch.Tensor, step: int, beta1: float, rank: int, kappa: int
) -> torch.Tensor:
    """The momentum direction ``(1 - beta1) u + beta1 decompress(c)``; then c takes in u.

    ``state`` holds ``exp_avg`` (the compressed c) and its ``seed``; ``step`` counts from 1.
    On steps that are multiples of ``kappa`` c moves to the next seed before taking in u.
    """
    seed, exp_avg = state["seed"], state["exp_avg"]
    direction = (1 - beta1) * update + beta1 * decompress(exp_avg, update.shape, rank, seed)
    if step % kappa == 0:
        state["seed"] = next_seed(seed)
        exp_avg.copy_(compress(decompress(exp_avg, update.shape, rank, seed), rank, state["seed"]))
    exp_avg.mul_(beta1).add_(compress(update, rank, state["seed"]), alpha=1 - beta1)
    return direction


@dataclass(frozen=True)
class _Owned:
    where: tuple[int, int]  # (group, index) in the param groups
    compressed: bool
    first_seed: int


class Flora(OwnsSomeParameters):
    """flora-opt's Flora for the non-adapter parameters, AdamW for the adapters' (see the module docstring).

    Args:
        param_groups: the trainer's groups (``lr``, ``weight_decay`` per group).
        model: the model, to tell adapter parameters and embeddings apart.
        rank: rows (or columns) of the compressed momentum.
        kappa: steps between resamples of the projection.
        beta1: momentum coefficient; 0 or None turns momentum off (plain Adafactor).
        decay_rate: ``beta2_t = 1 - t^decay_rate``.
        clip_threshold: the update's RMS is clipped to this.
        adafactor_eps: (added to squared gradients, floor of the parameter RMS scale).
        scale_parameter: multiply the lr by the parameter's RMS.
        factored: factored second moments for matrices.
        seed: base of every projection seed (each parameter gets its own from its position).
    """

    def __init__(
        self,
        param_groups: list[dict],
        model: nn.Module,
        rank: int = 8,
        kappa: int = 1000,
        beta1: float | None = 0.9,
        decay_rate: float = -0.8,
        clip_threshold: float = 1.0,
        adafactor_eps: tuple[float, float] = (1e-30, 1e-3),
        scale_parameter: bool = True,
        factored: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(param_groups, weight_decay=0.0)
        self.rank, self.kappa, self.beta1 = rank, kappa, beta1 or 0.0
        self.decay_rate, self.clip_threshold, self.adafactor_eps = decay_rate, clip_threshold, tuple(adafactor_eps)
        self.scale_parameter, self.factored = scale_parameter, factored
        self.owned = self._owned(model, seed)

    def _owned(self, model: nn.Module, seed: int) -> list[_Owned]:
        adapters = {id(p) for p in adapter_parameters(model).values()}
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        owned = []
        for g, group in enumerate(self.param_groups):
            for i, param in enumerate(group["params"]):
                if id(param) not in adapters:
                    compressed = self._compressible(param.shape) and id(param) not in embeddings
                    owned.append(_Owned((g, i), compressed, zlib.crc32(f"flora_opt/{seed}/{g}/{i}".encode())))
        return owned

    def _compressible(self, shape: torch.Size) -> bool:
        return (
            self.beta1 > 0
            and self.factored
            and len(shape) == 2
            and self.rank <= min(shape)
            and max(shape) / min(shape) <= MAX_ASPECT
        )

    def _step_owned(self) -> list[torch.Tensor]:
        params = []
        for owned in self.owned:
            group = self.param_groups[owned.where[0]]
            param = group["params"][owned.where[1]]
            if param.grad is not None:
                self._step_param(param, owned, group)
            params.append(param)
        return params

    def _step_param(self, param: torch.Tensor, owned: _Owned, group: dict) -> None:
        grad = param.grad.float()
        state = self.state[param]
        if not state:
            self._init_state(state, grad, owned)
        state["step"] += 1
        lr = group["lr"] * (max(self.adafactor_eps[1], _rms(param).item()) if self.scale_parameter else 1.0)
        update = self._preconditioned(state, grad)
        if owned.compressed:
            update = compressed_momentum(state, update, int(state["step"]), self.beta1, self.rank, self.kappa)
        elif self.beta1 > 0:
            update = state["exp_avg"].mul_(self.beta1).add_(update, alpha=1 - self.beta1).clone()
        update.div_((_rms(update) / self.clip_threshold).clamp_(min=1.0))
        param.mul_(1 - group["weight_decay"] * lr)
        param.add_(update.to(param.dtype), alpha=-lr)

    def _init_state(self, state: dict, grad: torch.Tensor, owned: _Owned) -> None:
        state["step"] = torch.tensor(0.0)  # a CPU float tensor, as AdamW's (its load_state_dict makes it one)
        if owned.compressed:
            m, n = grad.shape
            state["seed"] = owned.first_seed
            state["exp_avg"] = grad.new_zeros((self.rank, n) if m < n else (m, self.rank))
        elif self.beta1 > 0:
            state["exp_avg"] = torch.zeros_like(grad)
        if self._factored(grad):
            state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])  # (m,)
            state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])  # (n,)
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)

    def _factored(self, grad: torch.Tensor) -> bool:
        return self.factored and grad.dim() == 2

    def _preconditioned(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        """``grad / sqrt(v)`` with Adafactor's second moment v (factored for matrices)."""
        beta2 = 1.0 - int(state["step"]) ** self.decay_rate
        squared = grad**2 + self.adafactor_eps[0]
        if not self._factored(grad):
            state["exp_avg_sq"].mul_(beta2).add_(squared, alpha=1 - beta2)
            return state["exp_avg_sq"].rsqrt() * grad
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2).add_(squared.mean(dim=-1), alpha=1 - beta2)
        col.mul_(beta2).add_(squared.mean(dim=-2), alpha=1 - beta2)
        row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # (m, 1)
        return row_factor * col.unsqueeze(-2).rsqrt() * grad  # (m, n)


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().norm(2) / math.sqrt(tensor.numel())


@register_optimizer("flora_opt", zero_stages=(0,))
def flora_opt(param_groups: list[dict], model: nn.Module, args: dict) -> torch.optim.Optimizer:
    check_args("flora_opt", args, Flora)
    for key in ("rank", "kappa"):
        if not isinstance(args.get(key, 1), int) or args.get(key, 1) < 1:
            raise InputError(f"train.optimizer_args.{key} must be a positive integer, got {args[key]!r}")
    return Flora(param_groups, model, **args)
