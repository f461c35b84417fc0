"""Vision encoder: a timm or open_clip ViT that turns an image into patch tokens.

Both libraries expose ``forward_intermediates``, which returns the last block's
output, final-normed, without class/register tokens, as a ``[N, C, h, w]`` grid. The
encoder average-pools that grid (``pool``) and flattens it to ``[N, tokens, width]``.

Images may be fed at a resolution other than the checkpoint's: each library's own
loader resamples the position embeddings (timm's checkpoint filter, open_clip's
``resize_pos_embed``), so we only pass it the size we feed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import open_clip
import timm
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn
from torchvision.transforms import v2


class VisionConfig(BaseModel):
    """Which ViT to build, at what resolution, from which weights."""

    model_config = ConfigDict(extra="forbid")

    library: Literal["timm", "open_clip"] = Field(
        "timm", description="library that builds the ViT: timm or open_clip"
    )
    name: str = Field(
        description="model name in that library, e.g. timm 'vit_tiny_patch16_224' or open_clip 'ViT-L-14-336'"
    )
    image_size: int = Field(
        gt=0,
        description="side of the square images fed to the encoder; position embeddings are "
        "interpolated when it differs from the checkpoint's",
    )
    weights: str | None = Field(
        None,
        description="local checkpoint file (timm: a .safetensors/.pth state dict; open_clip: a full "
        "CLIP checkpoint); null = random init",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra arguments for timm.create_model (e.g. depth, embed_dim) or "
        "open_clip.create_model (e.g. vision_cfg, which replaces the named one whole)",
    )
    stem: Literal["patch", "conv"] = Field(
        "patch",
        description="patch: the model's own patchify layer; conv: stride-2 3x3 convolutions in its "
        "place (same grid; ViTs trained from scratch converge faster; timm only, random init only)",
    )
    pool: PositiveInt | tuple[PositiveInt, PositiveInt] = Field(
        1, description="average-pool the patch grid by this factor per side, or [rows, cols] factors, "
        "to cut tokens; 1 = off",
    )
    mean: list[float] = Field(
        default_factory=lambda: list(OPENAI_CLIP_MEAN), min_length=3, max_length=3,
        description="per-channel normalisation mean (RGB)",
    )
    std: list[float] = Field(
        default_factory=lambda: list(OPENAI_CLIP_STD), min_length=3, max_length=3,
        description="per-channel normalisation std (RGB)",
    )


    @model_validator(mode="after")
    def _conv_stem_is_random_timm(self) -> "VisionConfig":
        if self.stem == "conv" and (self.library != "timm" or self.weights is not None):
            raise ValueError("vision.stem: conv needs a timm ViT with random weights (vision.weights: null)")
        return self

    @property
    def pool_window(self) -> tuple[int, int]:
        """The pooling factors as (rows, cols)."""
        return (self.pool, self.pool) if isinstance(self.pool, int) else self.pool


class VisionEncoder(nn.Module):
    """A ViT returning (optionally grid-pooled) patch tokens, never prefix tokens.

    Args:
        backbone: the timm model, or the ``.visual`` tower of an open_clip model.
        cfg: the config it was built from.
        grid: the backbone's patch grid ``(rows, cols)`` at ``cfg.image_size``.
        width: the backbone's token width.
    """

    def __init__(self, backbone: nn.Module, cfg: VisionConfig, grid: tuple[int, int], width: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.library = cfg.library
        self.pool = cfg.pool_window
        self.grid = grid
        self._width = width
        self.transform = v2.Compose([
            v2.Resize((cfg.image_size, cfg.image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ])

    @property
    def num_tokens(self) -> int:
        """Tokens per image after pooling."""
        return (self.grid[0] // self.pool[0]) * (self.grid[1] // self.pool[1])

    @property
    def width(self) -> int:
        """Width of each token."""
        return self._width

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Turn a PIL image into the normalised ``[3, S, S]`` tensor the encoder expects.

        The whole image is resized to the square input (no crop), so nothing near the
        border is lost.
        """
        return self.transform(image.convert("RGB"))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            pixels: ``[N, 3, S, S]`` preprocessed images.

        Returns:
            ``[N, num_tokens, width]`` patch tokens, row-major over the (pooled) grid.
        """
        grid = self._patch_grid(pixels)  # (N, C, h, w)
        if self.pool != (1, 1):
            grid = F.avg_pool2d(grid, self.pool)  # (N, C, h/p_rows, w/p_cols)
        return grid.flatten(2).transpose(1, 2)  # (N, h*w, C)

    def _patch_grid(self, pixels: torch.Tensor) -> torch.Tensor:
        # last block only, final norm applied, prefix tokens dropped: (N, C, h, w)
        if self.library == "timm":
            (grid,) = self.backbone.forward_intermediates(pixels, indices=1, norm=True, intermediates_only=True)
        else:
            out = self.backbone.forward_intermediates(
                pixels, indices=1, normalize_intermediates=True, intermediates_only=True
            )
            (grid,) = out["image_intermediates"]
        return grid

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the ViT blocks on or off (both libraries support it)."""
        self.backbone.set_grad_checkpointing(enable)


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    """Build the configured ViT, loading ``cfg.weights`` if given.

    Args:
        cfg: the ``vision`` section of a model preset.

    Returns:
        The encoder, in training mode, on the CPU.

    Raises:
        FileNotFoundError: ``cfg.weights`` names no file.
        ValueError: the model is unknown, rejects ``cfg.kwargs``, has no patch grid, or
            its grid does not divide by ``cfg.pool``.
    """
    # Checked here because either library would take a missing path for a hub tag and download.
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"vision.weights: no such file {cfg.weights!r}")
    known = timm.is_model(cfg.name) if cfg.library == "timm" else _is_open_clip_model(cfg.name)
    if not known:
        raise ValueError(f"vision.name: {cfg.library} has no model {cfg.name!r}")
    build = _build_timm if cfg.library == "timm" else _build_open_clip
    try:
        backbone, grid, width = build(cfg)
    except TypeError as e:  # a constructor argument the model does not take
        raise ValueError(f"vision.kwargs: {cfg.library} cannot build {cfg.name!r} with {cfg.kwargs}: {e}") from e
    if cfg.stem == "conv":
        _replace_patchify_with_convs(backbone, cfg)
    if grid[0] % cfg.pool_window[0] or grid[1] % cfg.pool_window[1]:
        raise ValueError(f"vision.pool: {cfg.pool} does not divide the {grid[0]}x{grid[1]} patch grid of {cfg.name!r}")
    return VisionEncoder(backbone, cfg, grid, width)


def _replace_patchify_with_convs(backbone: nn.Module, cfg: VisionConfig) -> None:
    """Early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See Better")."""
    proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ValueError(f"vision.stem: conv needs a patchify convolution, {cfg.name!r} has none")
    patch = proj.stride[0]
    steps = patch.bit_length() - 1
    if 2**steps != patch or proj.stride[0] != proj.stride[1]:
        raise ValueError(f"vision.stem: conv needs a square power-of-two patch size, got {proj.stride}")
    width = proj.out_channels
    channels = [proj.in_channels, *[width >> (steps - i) for i in range(1, steps)], width]
    layers: list[nn.Module] = []
    for index in range(steps):
        layers.append(nn.Conv2d(channels[index], channels[index + 1], 3, stride=2, padding=1))
        if index < steps - 1:
            layers.append(nn.GELU())
    backbone.patch_embed.proj = nn.Sequential(*layers)


def _build_timm(cfg: VisionConfig) -> tuple[nn.Module, tuple[int, int], int]:
    # timm's own loader runs the model's checkpoint filter (which resamples pos_embed),
    # but loads non-strictly once the head is dropped, so missing keys are checked here.
    state = timm.models.load_state_dict(cfg.weights) if cfg.weights else None
    file_keys = set(state or ())
    model = timm.create_model(
        cfg.name,
        pretrained=state is not None,
        pretrained_cfg_overlay=dict(state_dict=state) if state is not None else None,
        img_size=cfg.image_size,
        num_classes=0,
        global_pool="",
        **cfg.kwargs,
    )
    missing = sorted(model.state_dict().keys() - file_keys)
    if state is not None and missing:
        raise ValueError(
            f"vision.weights: {cfg.weights!r} lacks {len(missing)} tensors of timm model {cfg.name!r} "
            f"with {cfg.kwargs}, e.g. {missing[:3]}"
        )
    patch_embed = getattr(model, "patch_embed", None)
    if not hasattr(patch_embed, "grid_size") or not hasattr(model, "forward_intermediates"):
        raise ValueError(f"vision.name: timm model {cfg.name!r} is not a ViT with a patch grid")
    return model, tuple(patch_embed.grid_size), model.num_features


def _build_open_clip(cfg: VisionConfig) -> tuple[nn.Module, tuple[int, int], int]:
    kwargs = dict(cfg.kwargs)
    if "vision_cfg" in kwargs:
        # a vision_cfg override replaces the named config whole, dropping force_image_size
        kwargs["vision_cfg"] = {**kwargs["vision_cfg"], "image_size": cfg.image_size}
    clip = open_clip.create_model(cfg.name, pretrained=cfg.weights, force_image_size=cfg.image_size, **kwargs)
    visual = clip.visual  # the text tower is dropped with `clip`
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"vision.name: open_clip model {cfg.name!r} has a {type(visual).__name__} image tower; "
            "only VisionTransformer towers give patch tokens"
        )
    return visual, tuple(visual.grid_size), visual.transformer.width


def _is_open_clip_model(name: str) -> bool:
    # 'hf-hub:' / 'local-dir:' names are resolved by open_clip itself
    return ":" in name or name in open_clip.list_models()
