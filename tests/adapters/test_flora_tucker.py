import string

import pytest
import torch
from torch import nn

from mmadapt.adapters import adapter_parameters, inject, merge, parse_spec, unmerge
from mmadapt.adapters.flora_tucker import FloraTucker
from mmadapt.errors import InputError
from tests.conftest import tiny_causal_lm

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONVS = {
    "conv1d": lambda: nn.Conv1d(6, 4, 3, stride=2, padding=1),
    "conv2d": lambda: nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    "conv2d groups=2": lambda: nn.Conv2d(6, 4, 3, groups=2, padding=1),
    "conv2d depthwise": lambda: nn.Conv2d(6, 12, 3, groups=6, padding="same", padding_mode="circular"),
    "conv3d": lambda: nn.Conv3d(4, 6, (2, 3, 3), stride=(1, 2, 2), padding=1, groups=2),
}


def tucker(base: nn.Module, **fields) -> FloraTucker:
    torch.manual_seed(0)
    adapter = FloraTucker(base, parse_spec({"type": "flora_tucker", **fields}))
    with torch.no_grad():
        adapter.core.normal_()  # a trained core: the zero init would hide every bug
    return adapter


def conv_input(conv: nn.Module) -> torch.Tensor:
    spatial = {nn.Conv1d: (9,), nn.Conv2d: (7, 8), nn.Conv3d: (4, 7, 6)}[type(conv)]
    return torch.randn(2, conv.in_channels, *spatial)


def tucker_einsum(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """Reference: one einsum over every mode, output already in (out, in, kernel...) order."""
    ranks, dims = string.ascii_lowercase[: core.dim()], string.ascii_uppercase[: core.dim()]
    terms = ",".join(d + r for d, r in zip(dims, ranks))
    return torch.einsum(f"{ranks},{terms}->{dims[1]}{dims[0]}{dims[2:]}", core, *factors)


def test_linear_is_lora_with_a_core():
    layer = nn.Linear(32, 16, bias=False)
    adapter = tucker(layer, r=3, ranks=[3, 5], scale=2.5)
    u_in, u_out = adapter.factors
    assert adapter.core.shape == (3, 5) and u_in.shape == (32, 3) and u_out.shape == (16, 5)
    # The core is stored in mode order [in, out]; as the r_out x r_in matrix C of U_out C U_in^T it is core.T.
    torch.testing.assert_close(adapter.delta_weight(), u_out @ adapter.core.T @ u_in.T * 2.5)
    x = torch.randn(7, 32)
    torch.testing.assert_close(adapter(x), x @ adapter.delta_weight().T)


def test_dense_path_when_ranks_exceed_the_layer():
    adapter = tucker(nn.Linear(4, 3), ranks=[16, 16])
    x = torch.randn(50, 4)
    assert not adapter._factored_is_cheaper(x.shape[0])
    u_in, u_out = adapter.factors
    torch.testing.assert_close(adapter(x), x @ u_in @ adapter.core @ u_out.T)


@pytest.mark.parametrize("name", CONVS)
def test_conv_delta_has_the_kernel_shape_and_matches_einsum(name):
    conv = CONVS[name]()
    adapter = tucker(conv, r=4)
    assert adapter.delta_weight().shape == conv.weight.shape
    assert adapter.factors[0].shape[0] == conv.in_channels // conv.groups
    assert list(adapter.core.shape) == [4, 4, *(min(4, k) for k in conv.kernel_size)]
    torch.testing.assert_close(adapter.delta_weight(), tucker_einsum(adapter.core, list(adapter.factors)))


def hooked(conv: nn.Module, adapter: FloraTucker) -> None:
    """What the proposed conv support in inject.py does: add forward_full's delta to the output."""
    def add_delta(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out if adapter.merged else out + adapter.forward_full(args[0])

    conv.register_forward_hook(add_delta)


@pytest.mark.parametrize("name", CONVS)
def test_conv_delta_is_the_conv_of_delta_w_and_merges_exactly(name):
    conv = CONVS[name]()
    adapter = tucker(conv, r=2, scale=4.0)
    x = conv_input(conv)
    base_out, w0 = conv(x), conv.weight.detach().clone()
    delta_w = adapter.delta_weight()
    assert delta_w.abs().sum() > 0
    twin = CONVS[name]()  # a plain copy of the layer holding W0 + delta_W
    with torch.no_grad():
        twin.weight.copy_(w0 + delta_w)
        twin.bias.copy_(conv.bias)
    # conv(x, W0 + dW) == conv(x, W0) + conv(x, dW), and the adapter's output is conv(x, dW)
    torch.testing.assert_close(twin(x), base_out + adapter.forward_full(x), rtol=1e-5, atol=1e-5)
    hooked(conv, adapter)
    adapted = conv(x)
    torch.testing.assert_close(adapted, twin(x), rtol=1e-5, atol=1e-5)
    adapter.merge()
    torch.testing.assert_close(conv(x), adapted, rtol=1e-5, atol=1e-5)
    adapter.unmerge()
    torch.testing.assert_close(conv.weight, w0, rtol=0, atol=1e-6)


def test_zero_init_conv_delta_is_zero():
    conv = nn.Conv2d(6, 4, 3, groups=2)
    adapter = FloraTucker(conv, parse_spec({"type": "flora_tucker", "r": 2}))
    x = conv_input(conv)
    assert torch.equal(adapter.forward_full(x), torch.zeros_like(conv(x)))
    assert torch.equal(adapter.delta_weight(), torch.zeros_like(conv.weight))
    # The factors are random (Kaiming-normal): only the zero core makes the delta vanish.
    assert all(f.abs().sum() > 0 for f in adapter.factors)


def test_tiny_llama_zero_init_and_merge():
    model = tiny_causal_lm()
    tokens = torch.randint(0, 97, (2, 10))
    base = model(input_ids=tokens).logits
    placed = inject(model, [{"type": "flora_tucker", "modalities": ["text"], "targets": ALL_PROJ, "r": 4}])
    assert len(placed["flora_tucker"]) == 14
    assert torch.equal(model(input_ids=tokens).logits, base)
    torch.manual_seed(3)
    for param in adapter_parameters(model).values():
        torch.nn.init.normal_(param, std=0.2)
    adapted = model(input_ids=tokens).logits
    assert not torch.allclose(adapted, base)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "mmadapt" not in n}
    assert len(merge(model)) == 14
    torch.testing.assert_close(model(input_ids=tokens).logits, adapted, rtol=1e-5, atol=1e-5)
    unmerge(model)
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(input_ids=tokens).logits, adapted)


def test_gradients_reach_core_first():
    layer = nn.Linear(8, 6)
    adapter = FloraTucker(layer, parse_spec({"type": "flora_tucker", "r": 2}))
    adapter(torch.randn(5, 8)).sum().backward()
    assert adapter.core.grad.abs().sum() > 0
    # With G = 0 the factors' first gradient is zero, as in the official code.
    assert all(torch.equal(f.grad, torch.zeros_like(f)) for f in adapter.factors)


def test_bad_input():
    with pytest.raises(InputError, match=r"Conv2d with weight shape \(4, 3, 3, 3\): ranks has 2 entries.*4 modes"):
        FloraTucker(nn.Conv2d(6, 4, 3, groups=2), parse_spec({"type": "flora_tucker", "ranks": [2, 2]}))
    with pytest.raises(InputError, match="not ConvTranspose2d"):
        FloraTucker(nn.ConvTranspose2d(4, 4, 3), parse_spec({"type": "flora_tucker"}))
    with pytest.raises(ValueError, match="not 'alpha'"):
        parse_spec({"type": "flora_tucker", "alpha": 8})
    with pytest.raises(ValueError, match="greater than 0"):
        parse_spec({"type": "flora_tucker", "ranks": [2, 0]})
