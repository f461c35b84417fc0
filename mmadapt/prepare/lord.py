"""LoRD (arXiv 2309.14021): replace linear layers by two dense low-rank factors.

A targeted ``nn.Linear`` with weight W (out x in) becomes a :class:`LowRankLinear`
computing ``x -> up(down(x))`` with ``up.weight = U_r`` (out x r) and
``down.weight = V_r = U_rᵀ W`` (r x in). ``U_r`` holds the r output directions kept:

- data-aware (default): the top-r eigenvectors of ``Y Yᵀ``, ``Y = W X`` the layer's
  outputs on calibration text, so the factors keep what the layer actually emits;
- data-free: the top-r left singular vectors of W (truncated SVD).

Both are one computation: with the input covariance ``C = X Xᵀ = L Lᵀ``, the
eigenvectors of ``Y Yᵀ = W C Wᵀ`` are the left singular vectors of ``W L``; data-free
takes ``C = I`` (``L = I``). Taking the SVD of ``W L`` rather than eigendecomposing
``W C Wᵀ`` avoids squaring the condition number. A layer is replaced only where
``r < out·in / (out + in)``, the rank below which the factors hold fewer parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..adapters.inject import matches
from ..errors import InputError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LowRankLinear(nn.Linear):
    """A linear layer stored as two factors: ``y = up(down(x))``, weight ``up.weight @ down.weight``.

    It stays an ``nn.Linear`` with the original ``in_features``/``out_features``, a
    read-only ``weight`` (the dense product, recomputed on each read) and ``bias``
    (``up``'s), so mmadapt adapters inject onto it under its original name (``q_proj``)
    and add their delta to its output exactly as on the dense layer. Writing into
    ``weight`` changes nothing: an adapter must not be merged into this layer.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate the dense weight this layer replaces
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)  # V_r (r, in)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype)  # U_r (out, r)

    @property
    def weight(self) -> torch.Tensor:  # (out, in)
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def reset_parameters(self) -> None:
        self.down.reset_parameters()
        self.up.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={bias}"


def break_even_rank(out_features: int, in_features: int) -> float:
    """The rank at which the two factors hold as many parameters as the dense weight."""
    return out_features * in_features / (out_features + in_features)


def factored_parameters(out_features: int, in_features: int, rank: int, bias: bool) -> int:
    """Parameters of a :class:`LowRankLinear`: ``r (in + out)`` plus the bias."""
    return rank * (in_features + out_features) + (out_features if bias else 0)


def plan_ranks(
    model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, rank: int | None = None, ratio: float | None = None
) -> dict[str, int]:
    """The rank of each targeted linear layer that factoring makes smaller.

    Args:
        model: the model whose ``nn.Linear`` layers are matched by name.
        targets: module-name suffixes or ``re:<regex>`` patterns, as for adapters.
        rank: one rank for every targeted layer; or
        ratio: the fraction of each layer's parameters to keep, in (0, 1):
            ``r = floor(ratio · out·in / (out + in))``.

    Returns:
        ``{module name: r}`` for the layers where ``r < out·in / (out + in)``.

    Raises:
        InputError: neither or both of rank/ratio, a value out of range, no layer
            matched, or no matched layer would get smaller.
    """
    if (rank is None) == (ratio is None):
        raise InputError("decompose: give exactly one of --rank and --ratio")
    if rank is not None and rank < 1:
        raise InputError(f"decompose: --rank must be at least 1, got {rank}")
    if ratio is not None and not 0 < ratio < 1:
        raise InputError(f"decompose: --ratio is the fraction of parameters kept, in (0, 1); got {ratio}")
    targets = list(targets)
    layers = {
        name: layer
        for name, layer in model.named_modules()
        if type(layer) is nn.Linear and any(matches(name, t) for t in targets)
    }
    if not layers:
        raise InputError(f"decompose: --targets {targets} match no linear layer of {type(model).__name__}")
    ranks = {}
    for name, layer in layers.items():
        limit = break_even_rank(layer.out_features, layer.in_features)
        chosen = rank if rank is not None else max(1, int(ratio * limit))
        if chosen < limit:
            ranks[name] = chosen
    if not ranks:
        largest = max(break_even_rank(m.out_features, m.in_features) for m in layers.values())
        setting = f"--rank {rank}" if rank is not None else f"--ratio {ratio}"
        raise InputError(
            f"decompose: {setting} makes none of the {len(layers)} targeted layers smaller; "
            f"a layer shrinks only below rank out·in/(out+in), at most {largest:.1f} here"
        )
    return ranks


def input_covariances(
    model: nn.Module, names: Iterable[str], batches: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``X Xᵀ`` (in x in, fp32) of each named linear layer's input over the calibration batches.

    Layers called one after another on the same input tensor (q/k/v, gate/up) share
    one matrix object, so each distinct input is accumulated and later factored once.
    """
    sums: dict[str, torch.Tensor] = {}
    last: list = [None, None]  # the latest input tensor and its covariance

    def accumulate(name: str, x: torch.Tensor) -> None:
        if last[0] is x:
            sums[name] = last[1]
            return
        rows = x.detach().reshape(-1, x.shape[-1]).float()  # (N, in)
        if name not in sums:
            sums[name] = rows.new_zeros(rows.shape[1], rows.shape[1])
        sums[name] += rows.T @ rows
        last[:] = [x, sums[name]]

    with _input_hooks(model, names, accumulate), torch.no_grad():
        for batch in tqdm(batches, desc="calibration", leave=False):
            model(input_ids=batch)
            last[:] = [None, None]
    return sums


@contextlib.contextmanager
def _input_hooks(model: nn.Module, names: Iterable[str], callback) -> Iterator[None]:
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _, args, name=name: callback(name, args[0]))
        for name in names
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def covariance_root(covariance: torch.Tensor) -> torch.Tensor:
    """L with ``L Lᵀ = covariance`` (in x in), from its eigendecomposition (it may be singular)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    return eigenvectors * eigenvalues.clamp(min=0).sqrt()


def decompose_linear(layer: nn.Linear, rank: int, root: torch.Tensor | None = None) -> LowRankLinear:
    """Factor ``layer`` at ``rank``: data-aware when ``root`` (``L``, ``L Lᵀ = X Xᵀ``) is given, else SVD.

    Returns:
        A :class:`LowRankLinear` on the layer's device and dtype, its bias copied.
    """
    weight = layer.weight.detach().double()  # (out, in)
    target = weight if root is None else weight @ root.to(weight.device)  # (out, in): W L
    if rank > min(target.shape):
        raise ValueError(f"rank {rank} exceeds min(out, in) = {min(target.shape)}")
    directions = torch.linalg.svd(target, full_matrices=False).U[:, :rank]  # U_r (out, r)
    bias = layer.bias is not None
    factored = LowRankLinear(layer.in_features, layer.out_features, rank, bias=bias, dtype=layer.weight.dtype)
    factored.to(layer.weight.device)
    with torch.no_grad():
        factored.up.weight.copy_(directions)
        factored.down.weight.copy_(directions.T @ weight)  # V_r = U_rᵀ W (r, in)
        if bias:
            factored.up.bias.copy_(layer.bias)
    factored.train(layer.training)
    return factored


def decompose(
    model: nn.Module, ranks: dict[str, int], covariances: dict[str, torch.Tensor] | None = None
) -> dict[str, LowRankLinear]:
    """Replace each layer of ``ranks`` in ``model`` by its factored form, in place.

    Args:
        ranks: ``{module name: r}``, as from :func:`plan_ranks`.
        covariances: ``{module name: X Xᵀ}`` from :func:`input_covariances` for the
            data-aware decomposition; None for data-free truncated SVD.

    Returns:
        The new modules by name.
    """
    roots: dict[int, torch.Tensor] = {}  # shared inputs are factored once
    replaced = {}
    for name, rank in tqdm(ranks.items(), desc="decompose", leave=False):
        root = None
        if covariances is not None:
            covariance = covariances[name]
            if id(covariance) not in roots:
                roots[id(covariance)] = covariance_root(covariance)
            root = roots[id(covariance)]
        replaced[name] = decompose_linear(model.get_submodule(name), rank, root)
        model.set_submodule(name, replaced[name])
    return replaced
