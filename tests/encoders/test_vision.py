import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mmadapt.encoders.vision import VisionConfig, build_vision_encoder

TINY_TIMM = dict(patch_size=8, depth=1)
TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=64, patch_size=16, width=64, head_width=32, layers=1),
    text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
)


def timm_cfg(**overrides) -> VisionConfig:
    return VisionConfig(**{"name": "vit_tiny_patch16_224", "image_size": 32, "kwargs": TINY_TIMM, **overrides})


def test_timm_gives_patch_tokens_without_cls():
    torch.manual_seed(0)
    enc = build_vision_encoder(timm_cfg())
    x = torch.randn(2, 3, 32, 32)

    tokens = enc(x)

    assert tokens.shape == (2, 16, 192) and (enc.num_tokens, enc.width) == (16, 192)
    assert torch.allclose(tokens, enc.backbone.forward_features(x)[:, 1:], atol=1e-6)


def test_pool_averages_2x2_patch_groups():
    torch.manual_seed(0)
    enc = build_vision_encoder(timm_cfg(pool=2))
    x = torch.randn(1, 3, 32, 32)

    tokens = enc(x)

    patches = enc.backbone.forward_features(x)[:, 1:].reshape(1, 4, 4, 192)  # (N, rows, cols, C)
    top_left = patches[0, :2, :2].mean(dim=(0, 1))
    bottom_right = patches[0, 2:, 2:].mean(dim=(0, 1))
    assert tokens.shape == (1, 4, 192) and enc.num_tokens == 4
    assert torch.allclose(tokens[0, 0], top_left, atol=1e-6)
    assert torch.allclose(tokens[0, 3], bottom_right, atol=1e-6)


def test_pool_rows_and_cols_separately():
    torch.manual_seed(0)
    enc = build_vision_encoder(timm_cfg(pool=[2, 1]))
    x = torch.randn(1, 3, 32, 32)

    tokens = enc(x)

    patches = enc.backbone.forward_features(x)[:, 1:].reshape(1, 4, 4, 192)  # (N, rows, cols, C)
    assert tokens.shape == (1, 8, 192) and enc.num_tokens == 8
    assert torch.allclose(tokens[0, 1], patches[0, :2, 1].mean(0), atol=1e-6)  # top half, second column
    assert torch.allclose(tokens[0, 4], patches[0, 2:, 0].mean(0), atol=1e-6)  # bottom half, first column


def test_pool_must_divide_grid():
    with pytest.raises(ValueError, match="vision.pool"):
        build_vision_encoder(timm_cfg(pool=3))


def test_timm_weights_load_at_another_resolution(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="", depth=1).eval()
    path = tmp_path / "vit.safetensors"
    save_file(ref.state_dict(), path)
    cfg = dict(image_size=112, weights=str(path), kwargs={"depth": 1})

    enc = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", **cfg)).eval()

    assert enc(torch.randn(1, 3, 112, 112)).shape == (1, 49, 192)
    assert torch.equal(enc.backbone.patch_embed.proj.weight, ref.patch_embed.proj.weight)
    assert enc.backbone.pos_embed.shape == (1, 1 + 49, 192)


def test_timm_weights_at_same_resolution_reproduce_tokens(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="", depth=1).eval()
    path = tmp_path / "vit.safetensors"
    save_file(ref.state_dict(), path)
    x = torch.randn(1, 3, 224, 224)

    enc = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", image_size=224, weights=str(path),
                                            kwargs={"depth": 1})).eval()

    assert torch.equal(enc(x), ref.forward_features(x)[:, 1:])


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_open_clip_weights_reproduce_tokens(tmp_path, suffix):
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", **TINY_CLIP).eval()
    path = tmp_path / f"clip.{suffix}"
    save_file(clip.state_dict(), path) if suffix == "safetensors" else torch.save(clip.state_dict(), path)
    x = torch.randn(2, 3, 64, 64)

    enc = build_vision_encoder(VisionConfig(library="open_clip", name="ViT-B-32", image_size=64,
                                            weights=str(path), kwargs=TINY_CLIP)).eval()

    clip.visual.output_tokens = True
    _, expected = clip.visual(x)  # (N, 16, 64), class token already dropped
    assert (enc.num_tokens, enc.width) == (16, 64)
    assert torch.allclose(enc(x), expected, atol=1e-6)


def test_open_clip_resamples_position_embeddings(tmp_path):
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", **TINY_CLIP)
    path = tmp_path / "clip.safetensors"
    save_file(clip.state_dict(), path)

    enc = build_vision_encoder(VisionConfig(library="open_clip", name="ViT-B-32", image_size=32,
                                            weights=str(path), kwargs=TINY_CLIP))

    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 4, 64)
    assert torch.equal(enc.backbone.conv1.weight, clip.visual.conv1.weight)
    # the class-token position survives; the 4x4 patch grid is resampled to 2x2
    assert torch.equal(enc.backbone.positional_embedding[0], clip.visual.positional_embedding[0])
    old_grid = clip.visual.positional_embedding[1:].T.reshape(1, 64, 4, 4)
    resampled = F.interpolate(old_grid, size=(2, 2), mode="bicubic", antialias=True).reshape(64, 4).T
    assert torch.allclose(enc.backbone.positional_embedding[1:], resampled, atol=1e-6)


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_missing_weights_file_is_named(tmp_path, library):
    missing = tmp_path / "nope.safetensors"
    name = "vit_tiny_patch16_224" if library == "timm" else "ViT-B-32"
    cfg = VisionConfig(library=library, name=name, image_size=32, weights=str(missing))

    with pytest.raises(FileNotFoundError, match=r"vision\.weights.*nope\.safetensors"):
        build_vision_encoder(cfg)


def test_preprocess_resizes_and_normalises():
    enc = build_vision_encoder(timm_cfg(mean=[0.5] * 3, std=[0.5] * 3))
    white = Image.new("L", (50, 20), color=255)  # grey-scale, not square

    pixels = enc.preprocess(white)

    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert torch.allclose(pixels, torch.ones(3, 32, 32))


def test_grad_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    enc = build_vision_encoder(timm_cfg())
    x = torch.randn(1, 3, 32, 32)
    enc(x).square().sum().backward()
    plain = enc.backbone.patch_embed.proj.weight.grad.clone()
    enc.zero_grad()

    enc.set_grad_checkpointing(True)
    enc(x).square().sum().backward()

    assert enc.backbone.grad_checkpointing
    assert torch.allclose(enc.backbone.patch_embed.proj.weight.grad, plain, atol=1e-5)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="img_size"):
        VisionConfig(name="vit_tiny_patch16_224", image_size=32, img_size=32)


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_unknown_model_name_is_named(library):
    with pytest.raises(ValueError, match="vision.name.*'vit_nope'"):
        build_vision_encoder(VisionConfig(library=library, name="vit_nope", image_size=32))


def test_bad_kwarg_is_named():
    with pytest.raises(ValueError, match="vision.kwargs.*dpeth"):
        build_vision_encoder(timm_cfg(kwargs={"dpeth": 1}))


def test_timm_weights_missing_tensors_are_named(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="", depth=1)
    path = tmp_path / "vit.safetensors"
    save_file(ref.state_dict(), path)
    cfg = VisionConfig(name="vit_tiny_patch16_224", image_size=32, weights=str(path), kwargs={"depth": 2})

    with pytest.raises(ValueError, match=r"vision\.weights.*blocks\.1\."):
        build_vision_encoder(cfg)


def test_timm_weights_with_classifier_head_load(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", depth=1)  # 1000-class head, dropped on load
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)

    enc = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", image_size=224, weights=str(path),
                                            kwargs={"depth": 1}))

    assert torch.equal(enc.backbone.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_conv_stem_keeps_the_grid_and_trains():
    cfg = VisionConfig(name="vit_tiny_patch16_224", image_size=32, kwargs={"patch_size": 8, "depth": 1}, stem="conv")
    encoder = build_vision_encoder(cfg)
    convs = [m for m in encoder.backbone.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 and convs[-1].out_channels == encoder.width
    tokens = encoder(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 16, encoder.width)
    tokens.sum().backward()
    assert convs[0].weight.grad.abs().sum() > 0


def test_conv_stem_refuses_pretrained_weights(tmp_path):
    with pytest.raises(ValueError, match="vision.stem"):
        VisionConfig(name="vit_tiny_patch16_224", image_size=32, weights=str(tmp_path / "w.pt"), stem="conv")
