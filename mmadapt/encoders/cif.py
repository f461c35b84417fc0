"""Continuous integrate-and-fire (CIF): frames to tokens, in closed form.

CIF (Dong & Xu, 2020) walks over the frames accumulating weights ``alpha_t`` and
"fires" a token each time the accumulated weight crosses the threshold θ. With
``c_t = alpha_1 + ... + alpha_t`` (``c_0 = 0``), token ``n`` (0-based) is

    token_n = Σ_t w[n, t] · h_t,   w[n, t] = max(0, min(c_t, (n+1)θ) − max(c_{t−1}, nθ)),

the part of frame t's weight that falls inside ``[nθ, (n+1)θ)``. A token is a weighted
*sum* of frames (as in BLSP and FunASR), so the weights of a full token add up to θ.
A row yields ``floor(c_T / θ)`` full tokens; the remainder ``c_T − floor(c_T/θ)·θ`` is
dropped, or, when ``tail_threshold`` is given and the remainder reaches it, becomes one
more token whose weights add up to the remainder (it is not rescaled to θ).

No loop over frames or tokens: frame t touches only the tokens ``floor(c_{t−1}/θ) ..
floor(c_t/θ)`` (several when alpha_t > θ), so ``w`` is a band with about ``T + N``
non-zeros per row. They are listed with tensor ops as (token, frame, weight) triples,
already ordered by token, and ``F.embedding_bag(mode="sum", per_sample_weights=w)``
computes every weighted sum in one fused, differentiable gather-and-add (one bag per
output token, empty for padding). The cumulative sum and the weights are computed in
float64, so 100k-frame inputs do not drift, then cast to ``hidden``'s dtype for the sum
(float32 for 16-bit frames); gradients reach both ``hidden`` and ``alphas`` (through ``w``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cif(
    hidden: torch.Tensor, alphas: torch.Tensor, threshold: float = 1.0, tail_threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate frames into tokens with continuous integrate-and-fire (closed form above).

    Args:
        hidden: ``[B, T, D]`` frames (float32, bfloat16, float16 or float64).
        alphas: ``[B, T]`` non-negative weights; padding frames must have weight 0.
        threshold: θ > 0, the weight one token integrates.
        tail_threshold: when set (0 < tail_threshold <= θ), a remainder of at least this
            much after the last firing becomes one more token (weights not rescaled).

    Returns:
        ``(tokens, lengths)``: ``tokens`` ``[B, N_max, D]`` in ``hidden``'s dtype, zero
        beyond each row's length (``N_max`` may be 0); ``lengths`` LongTensor ``[B]``.

    Raises:
        ValueError: on mismatched shapes, θ <= 0, a tail threshold outside (0, θ], or
            negative / non-finite alphas.
    """
    _check(hidden, alphas, threshold, tail_threshold)
    batch, time, width = hidden.shape
    if alphas.numel() == 0:
        return hidden.new_zeros(batch, 0, width), torch.zeros(batch, dtype=torch.long, device=hidden.device)
    # cumulative weight in units of θ: token n gathers what falls inside [n, n+1)
    scaled = alphas.double() if threshold == 1 else alphas.double() / threshold
    u_all = F.pad(scaled, (1, 0)).cumsum(1)  # (B, T+1), u_0 = 0
    u_prev, u = u_all[:, :-1], u_all[:, 1:]  # c_{t-1}/θ, c_t/θ
    lengths = _token_counts(u[:, -1], None if tail_threshold is None else tail_threshold / threshold)  # (B,)
    # one host sync for all three (NaN fails the >= test, +inf makes the sum non-finite)
    smallest, total, n_max = torch.stack([alphas.min().double(), u[:, -1].sum(), lengths.max()]).tolist()
    if not (smallest >= 0 and math.isfinite(total)):
        raise ValueError("cif: alphas must be finite and non-negative")
    n_max = int(n_max)

    # Band of w: frame t feeds tokens first .. end-1; tokens past the row's length are dropped.
    # Every index op below is a cheap 1-D pass over B·T or E entries: together they cost
    # about as much as the embedding_bag, which reads all of ``hidden`` once.
    first = u_prev.floor()  # (B, T)
    end = torch.minimum(u.floor() + 1, lengths[:, None])
    per_frame = (end - first).clamp_min_(0).long().flatten()  # (B·T,)
    frame = torch.repeat_interleave(per_frame)  # (E,) frame of each band entry, in order
    frame_start = per_frame.cumsum(0) - per_frame  # (B·T,) its first entry
    step = torch.arange(len(frame), device=frame.device) - frame_start.index_select(0, frame)  # token - first
    # output row b·N_max + token: entries come sorted by it, so each row's entries are one bag
    first_row = first.long() + torch.arange(batch, device=first.device)[:, None] * n_max  # (B, T)
    bag = first_row.flatten().index_select(0, frame) + step  # (E,)
    per_bag = torch.bincount(bag, minlength=batch * n_max)
    offsets = per_bag.cumsum(0) - per_bag

    # w / θ = min(u_t, n+1) - max(u_{t-1}, n), written relative to `first` (exact in float64)
    k = step.double()
    above = (u - first).flatten().index_select(0, frame)  # u_t - first, per entry
    below = (u_prev - first).flatten().index_select(0, frame)
    weight = torch.minimum(above, k + 1).sub_(torch.maximum(below, k)).clamp_min_(0)  # -1 ulp at most
    if threshold != 1:
        weight.mul_(threshold)
    # 16-bit frames are summed in float32: more exact, and CUDA has no bf16 backward to the weights
    summed = torch.float32 if hidden.dtype in (torch.bfloat16, torch.float16) else hidden.dtype
    tokens = F.embedding_bag(
        frame, hidden.reshape(batch * time, width).to(summed), offsets, mode="sum",
        per_sample_weights=weight.to(summed),
    )
    return tokens.view(batch, n_max, width).to(hidden.dtype), lengths


def _token_counts(total: torch.Tensor, tail: float | None) -> torch.Tensor:
    """Full firings per row (``total`` in units of θ), plus one where the remainder reaches ``tail``."""
    full = torch.floor(total)
    if tail is not None:
        full = full + (total - full >= tail)
    return full.long()


def _check(hidden: torch.Tensor, alphas: torch.Tensor, threshold: float, tail_threshold: float | None) -> None:
    if hidden.dim() != 3 or alphas.shape != hidden.shape[:2]:
        raise ValueError(
            f"cif: hidden must be [B, T, D] and alphas [B, T]; got {tuple(hidden.shape)} and {tuple(alphas.shape)}"
        )
    if not threshold > 0:
        raise ValueError(f"cif: threshold must be > 0, got {threshold}")
    if tail_threshold is not None and not 0 < tail_threshold <= threshold:
        raise ValueError(f"cif: tail_threshold must be in (0, threshold={threshold}], got {tail_threshold}")
