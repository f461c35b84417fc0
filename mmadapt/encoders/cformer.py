"""CFormer: speech-encoder frames to one token per text token, through CIF.

After BLSP-Emo's released ``CFormer`` (cwang621/blsp-emo, ``src/modeling_adapter.py``),
which BLSP-KD uses::

    hidden [B, T, W] (frame_mask) --pre-CIF layers--> [B, T, W]
        Linear(W, 1) + bias --sigmoid, 0 on padding--> alphas [B, T] --rescale to the token count-->
        all channels --cif()--> [B, N, W] --Linear(W, W)--> --post-CIF layers--> tokens [B, N, W]

Unlike there, the alpha comes from its own linear head rather than the last channel of
the pre-CIF output: the head starts at zero weight with its bias at ``alpha_init``, so
the first steps see uniform segmentation at about the data's token rate. Read off a
channel whose scale depends on the encoder, the initial Σα was 5x the token count here,
the quantity loss drove every alpha into sigmoid saturation, and it stayed stuck at 1.0
(no gradient) for ~50 steps. With no pre-CIF layers a ``Linear(W, W)`` takes their place. Their layers are Whisper encoder layers (pre-norm,
GELU); here they are ``nn.TransformerEncoderLayer`` with ``norm_first=True`` and GELU, and,
unlike theirs, the pre-CIF layers mask padding frames. Their LM head (a CTC-style
auxiliary) and the projection to the LLM width are left out: the projector lives in
``mmadapt.projectors``.

Token count: in training it is the transcript's length (alphas rescaled so their sum is
exactly that many firings); in inference ``max(1, round(Σα / θ))``, rescaled the same way,
so any real audio, silence included, yields at least one token. After rescaling the CIF
remainder is only float round-off; ``tail_threshold`` fires it when it is just below a
whole token, which keeps the count exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from mmadapt.encoders.cif import cif
from mmadapt.errors import InputError


class CFormerConfig(BaseModel):
    """Shape of the CFormer between the speech encoder and the projector."""

    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(
        None, gt=1, description="width of the speech encoder's frames and of the output tokens; null: the encoder's"
    )
    pre_layers: int = Field(1, ge=0, description="transformer layers before CIF (0: a single Linear, as in BLSP)")
    post_layers: int = Field(1, ge=0, description="transformer layers over the CIF tokens")
    heads: int = Field(4, gt=0, description="attention heads per layer; must divide width")
    ffn: int | None = Field(None, gt=0, description="feed-forward width of each layer; null = 4 x width")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout inside the transformer layers")
    threshold: float = Field(1.0, gt=0, description="CIF firing threshold: the alpha weight one token integrates")
    alpha_init: float = Field(
        0.1, gt=0, lt=1, description="typical CIF weight per frame at init (the alpha head's bias): about one "
        "token per 1/alpha_init encoder frames; near the data's rate keeps the quantity loss from saturating sigmoid",
    )
    tail_threshold: float = Field(
        0.5, gt=0, description="a CIF remainder at least this large fires one more token; after rescaling "
        "the remainder is round-off only, so this keeps counts exact (must be <= threshold)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "CFormerConfig":
        if self.width is not None and self.width % self.heads:
            raise ValueError(f"cformer.heads: {self.heads} does not divide cformer.width {self.width}")
        if self.tail_threshold > self.threshold:
            raise ValueError(f"cformer.tail_threshold: {self.tail_threshold} exceeds threshold {self.threshold}")
        return self


@dataclass
class CifOutput:
    """CFormer result: ``tokens [B, N, W]`` (zero past each length), ``lengths [B]``,
    ``alpha_sum [B]``: Σα before rescaling (float32, differentiable), for the quantity loss."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    alpha_sum: torch.Tensor


class CFormer(nn.Module):
    """Pre-CIF transformer, alpha head, CIF, post-CIF transformer (see the module docstring).

    Args:
        cfg: the CFormer config.
    """

    def __init__(self, cfg: CFormerConfig) -> None:
        super().__init__()
        if cfg.width is None:
            raise ValueError("CFormerConfig.width must be set (the speech encoder's width)")
        self.cfg = cfg
        if cfg.pre_layers:
            self.pre = nn.ModuleList(_layer(cfg) for _ in range(cfg.pre_layers))
        else:
            self.pre_linear = nn.Linear(cfg.width, cfg.width)
        self.alpha_head = nn.Linear(cfg.width, 1)
        nn.init.zeros_(self.alpha_head.weight)
        nn.init.constant_(self.alpha_head.bias, math.log(cfg.alpha_init / (1 - cfg.alpha_init)))
        self.cif_proj = nn.Linear(cfg.width, cfg.width)
        self.post = nn.ModuleList(_layer(cfg) for _ in range(cfg.post_layers))

    def forward(
        self, hidden: torch.Tensor, frame_mask: torch.Tensor, target_lengths: torch.Tensor | None = None
    ) -> CifOutput:
        """Segment frames into tokens.

        Args:
            hidden: ``[B, T, W]`` speech-encoder frames.
            frame_mask: ``Bool[B, T]``, True on real frames; every row needs at least one.
            target_lengths: ``Long[B]`` token counts to produce (training: the transcripts'
                lengths, each >= 1); None: the model's own estimate, at least 1.

        Returns:
            :class:`CifOutput` with exactly ``target_lengths`` (or the estimate) tokens per row.

        Raises:
            InputError: a row has no real frame, or a target length is below 1.
        """
        _check(hidden, frame_mask, target_lengths)
        with _unfused_layers():
            return self._segment(hidden, frame_mask, target_lengths)

    def _segment(
        self, hidden: torch.Tensor, frame_mask: torch.Tensor, target_lengths: torch.Tensor | None
    ) -> CifOutput:
        x = self._pre_cif(hidden, frame_mask)  # (B, T, W)
        # alphas in fp32 whatever the layers' dtype: they decide token boundaries
        alphas = torch.sigmoid(self.alpha_head(x).squeeze(-1).float()).masked_fill(~frame_mask, 0.0)  # (B, T)
        alpha_sum = alphas.sum(-1)  # (B,)
        threshold = self.cfg.threshold
        if target_lengths is None:
            target_lengths = torch.round(alpha_sum.detach() / threshold).long().clamp_min(1)
        scaled = _rescale(alphas, frame_mask, target_lengths * threshold)
        frames = x.masked_fill(~frame_mask[..., None], 0.0)  # padding may hold anything
        tokens, lengths = cif(frames, scaled, threshold, self.cfg.tail_threshold)  # (B, N, W)
        token_mask = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]  # (B, N)
        y = self.cif_proj(tokens)
        for layer in self.post:
            y = layer(y, src_key_padding_mask=~token_mask)
        return CifOutput(y.masked_fill(~token_mask[..., None], 0.0), lengths, alpha_sum)

    def _pre_cif(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        if not self.cfg.pre_layers:
            return self.pre_linear(hidden)
        x = hidden
        for layer in self.pre:
            x = layer(x, src_key_padding_mask=~frame_mask)
        return x


def quantity_loss(alpha_sum: torch.Tensor, target_lengths: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """CIF quantity loss: ``mean(|Σα/θ − N| / N)`` over the batch.

    Args:
        alpha_sum: ``[B]`` Σα before rescaling (``CifOutput.alpha_sum``).
        target_lengths: ``[B]`` transcript token counts N, each >= 1.
        threshold: the CIF threshold θ (Σα/θ is the number of tokens the alphas fire).

    Raises:
        InputError: a target length is below 1.
    """
    if bool((target_lengths < 1).any()):
        raise InputError(f"quantity loss: target lengths must be >= 1, got {target_lengths.tolist()}")
    targets = target_lengths.to(alpha_sum.dtype)
    return ((alpha_sum / threshold - targets).abs() / targets).mean()


@contextmanager
def _unfused_layers() -> Iterator[None]:
    """Keep ``nn.TransformerEncoderLayer`` off its fused inference kernel.

    Under no_grad that kernel ran the CFormer's layers into "misaligned address" and
    CUBLAS_STATUS_INTERNAL_ERROR on an H100 (torch 2.11, bf16 and fp32, with padding
    masks); the plain path computes the same layer.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _layer(cfg: CFormerConfig) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        cfg.width, cfg.heads, cfg.ffn or 4 * cfg.width, cfg.dropout,
        activation="gelu", batch_first=True, norm_first=True,
    )


def _check(hidden: torch.Tensor, frame_mask: torch.Tensor, target_lengths: torch.Tensor | None) -> None:
    if frame_mask.shape != hidden.shape[:2] or frame_mask.dtype != torch.bool:
        raise ValueError(
            f"cformer: frame_mask must be Bool{list(hidden.shape[:2])}, got {frame_mask.dtype}{list(frame_mask.shape)}"
        )
    empty = (~frame_mask.any(1)).nonzero().flatten()
    if len(empty):
        raise InputError(f"cformer: speech items {empty.tolist()} have no frames")
    if target_lengths is not None and bool((target_lengths < 1).any()):
        raise InputError(f"cformer: target token counts must be >= 1, got {target_lengths.tolist()}")


def _rescale(alphas: torch.Tensor, frame_mask: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Alphas scaled to sum to ``total`` per row, in float64 so the sum is exact to round-off.

    A row whose alphas all underflowed to 0 spreads ``total`` evenly over its real frames,
    so it still fires the requested count.
    """
    alphas = alphas.double()
    alpha_sum = alphas.sum(-1, keepdim=True)  # (B, 1)
    positive = alpha_sum > 0
    uniform = frame_mask / frame_mask.sum(-1, keepdim=True)
    share = torch.where(positive, alphas / torch.where(positive, alpha_sum, 1.0), uniform)  # no 0/0 in backward
    return share * total[:, None]
