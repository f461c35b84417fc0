import pytest
import torch
from torch import nn

from mmadapt.projectors import ProjectorConfig, build_projector, embedding_rms


def test_embedding_rms_is_root_mean_square_of_table():
    emb = nn.Embedding(4, 2)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))

    assert embedding_rms(emb) == pytest.approx((25 / 8) ** 0.5)


def test_output_starts_on_text_scale():
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(), in_width=16, out_width=24, text_embedding_rms=0.14)
    tokens = 5 * torch.randn(2, 7, 16)  # encoder tokens far off the text scale

    out = proj(tokens)

    rms = out.pow(2).mean(-1).sqrt()  # (2, 7)
    assert out.shape == (2, 7, 24)
    assert torch.allclose(rms, torch.full_like(rms, 0.14), atol=1e-4)


def test_default_mlp_is_linear_gelu_linear_at_llm_width():
    proj = build_projector(ProjectorConfig(), in_width=16, out_width=24, text_embedding_rms=0.1)

    kinds = [type(m) for m in proj.layers]

    assert kinds == [nn.Linear, nn.GELU, nn.Linear]
    assert proj.layers[0].out_features == 24


def test_depth_and_hidden_shape_the_mlp():
    proj = build_projector(ProjectorConfig(depth=3, hidden=8), in_width=16, out_width=24, text_embedding_rms=0.1)

    linears = [m for m in proj.layers if isinstance(m, nn.Linear)]

    assert [(m.in_features, m.out_features) for m in linears] == [(16, 8), (8, 8), (8, 24)]


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(), in_width=16, out_width=24, text_embedding_rms=0.14)

    proj(torch.randn(3, 16)).sum().backward()

    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


def test_scale_is_learnable():
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(), in_width=16, out_width=24, text_embedding_rms=0.14)
    with torch.no_grad():
        proj.scale.fill_(0.5)

    rms = proj(torch.randn(3, 16)).pow(2).mean(-1).sqrt()

    assert torch.allclose(rms, torch.full_like(rms, 0.5), atol=1e-4)


def test_linear_without_scale_matching_is_one_affine_map():
    torch.manual_seed(0)
    cfg = ProjectorConfig(type="linear", match_text_scale=False)
    proj = build_projector(cfg, in_width=16, out_width=24, text_embedding_rms=0.14)
    x = torch.randn(3, 16)

    out = proj(x)

    assert len(proj.layers) == 1 and proj.scale is None
    assert torch.allclose(out, x @ proj.layers[0].weight.T + proj.layers[0].bias)


def test_unknown_type_is_rejected():
    with pytest.raises(ValueError, match="type"):
        ProjectorConfig(type="qformer")
