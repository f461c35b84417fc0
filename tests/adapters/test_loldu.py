import pytest
import torch
from torch import nn

from mmadapt.adapters import adapter_parameters, adapters_of, inject, merge, modality_ids, parse_spec, unmerge
from mmadapt.adapters.loldu import LoLDU
from mmadapt.errors import InputError
from mmadapt.modality import IMAGE, TEXT
from tests.conftest import tiny_causal_lm

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(out_features, in_features, r, **fields):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features)
    return layer, LoLDU(layer, parse_spec({"type": "loldu", "r": r, **fields}))


def _move(adapter):
    """Stand in for training: move z and sigma away from their init."""
    with torch.no_grad():
        adapter.z.add_(torch.randn_like(adapter.z) * 0.3)
        if isinstance(adapter.sigma, nn.Parameter):
            adapter.sigma.mul_(1.7)


@pytest.mark.parametrize("shape", [(24, 24), (40, 16), (16, 40)])
def test_full_rank_ldu_reconstructs_the_weight(shape):
    layer, adapter = _adapter(*shape, r=min(shape))
    assert torch.equal(torch.sort(adapter.perm).values, torch.arange(shape[0]))
    assert torch.equal(torch.diagonal(adapter.upper), torch.ones(min(shape)))
    assert torch.equal(adapter.lower.triu(1), torch.zeros_like(adapter.lower))
    rebuilt = (adapter.lower * adapter.pivots)[adapter.perm] @ adapter.upper  # P L diag(D) U
    assert (rebuilt - layer.weight).norm() <= 1e-4 * layer.weight.norm()


def test_delta_is_exactly_zero_at_init():
    _, adapter = _adapter(40, 16, r=8)
    assert torch.equal(adapter.delta_weight(), torch.zeros(40, 16))
    assert torch.equal(adapter(torch.randn(5, 16)), torch.zeros(5, 40))


def test_delta_is_exactly_zero_at_init_with_bf16_parameters_and_fp32_buffers():
    """DeepSpeed's bf16 mode: z is rounded to bf16, the pivots buffer stays fp32."""
    _, adapter = _adapter(40, 16, r=8)
    for param in adapter.parameters():
        param.data = param.data.to(torch.bfloat16)
    assert adapter.pivots.dtype == torch.float32 and not torch.equal(adapter.z.float(), adapter.pivots)
    rows = torch.randn(5, 16, dtype=torch.bfloat16)
    assert torch.equal(adapter(rows), torch.zeros(5, 40, dtype=torch.bfloat16))


def test_delta_weight_matches_projected_form_and_forward():
    _, adapter = _adapter(16, 40, r=6, alpha=3.0)
    _move(adapter)
    permutation = torch.eye(16)[adapter.perm]  # dense P, P[i, perm[i]] = 1
    coefficient = adapter.sigma * adapter.z - 0.5 * adapter.pivots
    expected = permutation @ adapter.lower @ torch.diag(coefficient) @ adapter.upper
    torch.testing.assert_close(adapter.delta_weight(), expected)
    x = torch.randn(5, 40)
    torch.testing.assert_close(adapter(x), x @ expected.T)


@pytest.mark.parametrize("train_sigma", [True, False])
def test_only_z_and_sigma_are_trainable(train_sigma):
    layer, adapter = _adapter(24, 16, r=4, train_sigma=train_sigma)
    layer.requires_grad_(False)
    trainable = {"z", "sigma"} if train_sigma else {"z"}
    assert {name for name, _ in adapter.named_parameters()} == trainable
    assert all(not buffer.requires_grad for buffer in adapter.buffers())
    _move(adapter)
    adapter(torch.randn(5, 16)).square().sum().backward()
    for name, param in adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert adapter.state_dict().keys() == trainable


def test_zero_init_equals_base_on_model():
    model = tiny_causal_lm()
    tokens = torch.randint(0, 97, (2, 10))
    base = model(input_ids=tokens).logits
    inject(model, [{"type": "loldu", "modalities": ["image"], "targets": ALL_PROJ, "r": 4}])
    ids = torch.full((2, 10), TEXT)
    ids[:, 3:7] = IMAGE
    with modality_ids(model, ids):
        assert torch.equal(model(input_ids=tokens).logits, base)
    assert len(adapter_parameters(model)) == 2 * 7 * 2  # z and sigma per layer


def test_merge_and_unmerge_on_text_modality():
    model = tiny_causal_lm()
    tokens = torch.randint(0, 97, (2, 10))
    base = model(input_ids=tokens).logits
    inject(model, [{"type": "loldu", "modalities": ["text"], "targets": ALL_PROJ, "r": 4}])
    torch.manual_seed(1)
    for _, adapter in adapters_of(model):
        _move(adapter)
    weights = {name: m.weight.clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unmerged = model(input_ids=tokens).logits
    assert not torch.allclose(unmerged, base, atol=1e-3)
    assert len(merge(model)) == 2 * 7
    torch.testing.assert_close(model(input_ids=tokens).logits, unmerged, atol=1e-5, rtol=0)
    unmerge(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            torch.testing.assert_close(module.weight, weights[name], atol=1e-6, rtol=0)


def test_tiny_pivot_is_clamped_with_a_warning():
    layer = nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight[:, 0] = 0.0  # the first pivot is zero
    with pytest.warns(UserWarning, match=r"1 of the first 4 LU pivots .*\(out=8, in=8\)"):
        adapter = LoLDU(layer, parse_spec({"type": "loldu", "r": 4}))
    assert adapter.pivots.abs().min() >= 1e-6
    assert torch.isfinite(adapter.upper).all()
    assert torch.equal(adapter.delta_weight(), torch.zeros(8, 8))


def test_r_larger_than_min_side_is_rejected():
    # k_proj is 32 -> 16, so at most 16 pivots.
    with pytest.raises(InputError, match=r"loldu: r=17 exceeds min\(out, in\) = 16 .*\(out=16, in=32\)"):
        inject(tiny_causal_lm(), [{"type": "loldu", "targets": ["k_proj"], "r": 17}])
