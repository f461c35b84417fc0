import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mmadapt.adapters import adapter_parameters, inject, merge, parse_spec, unmerge
from mmadapt.adapters.dora import DoRA
from mmadapt.errors import InputError
from tests.conftest import tiny_causal_lm

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _perturb(params, std=0.05, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * std)


def _adapter(grad_through_norm=False, dtype=torch.float64):
    torch.manual_seed(0)
    layer = nn.Linear(10, 12, dtype=dtype)
    spec = {"type": "dora", "r": 3, "alpha": 5.0, "dora_grad_through_norm": grad_through_norm}
    adapter = DoRA(layer, parse_spec(spec))
    _perturb(adapter.parameters(), std=0.3)
    return layer, adapter


def _dense_weight(layer, adapter, detach_norm):
    """W' = (m / ||V||) V with V = W0 + s B A, by autograd on the plain formula."""
    v = layer.weight + adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight
    norm = v.norm(dim=1)
    return (adapter.magnitude / (norm.detach() if detach_norm else norm)).unsqueeze(1) * v


@pytest.mark.parametrize("grad_through_norm", [False, True])
def test_grads_match_dense_reparametrisation(grad_through_norm):
    layer, adapter = _adapter(grad_through_norm)
    layer.requires_grad_(False)
    x = torch.randn(7, 10, dtype=torch.float64)
    grad_y = torch.randn(7, 12, dtype=torch.float64)
    ((layer(x) + adapter(x)) * grad_y).sum().backward()
    got = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    adapter.zero_grad()
    ((x @ _dense_weight(layer, adapter, not grad_through_norm).T + layer.bias) * grad_y).sum().backward()
    for name, param in adapter.named_parameters():
        torch.testing.assert_close(got[name], param.grad, msg=name)


def test_magnitude_grad_formula_with_detached_norm():
    """dL/dm = sum over rows of grad_y * (x V^T) / ||V||."""
    layer, adapter = _adapter()
    x = torch.randn(7, 10, dtype=torch.float64)
    grad_y = torch.randn(7, 12, dtype=torch.float64)
    (adapter(x) * grad_y).sum().backward()
    v = (layer.weight + adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight).detach()
    torch.testing.assert_close(adapter.magnitude.grad, (grad_y * (x @ v.T) / v.norm(dim=1)).sum(0))


def test_forward_equals_delta_weight_and_keeps_bias_unscaled():
    layer, adapter = _adapter()
    x = torch.randn(5, 10, dtype=torch.float64)
    merged = _dense_weight(layer, adapter, detach_norm=True)
    torch.testing.assert_close(layer(x) + adapter(x), x @ merged.T + layer.bias)
    torch.testing.assert_close(adapter(x), x @ adapter.delta_weight().T)


def test_init_equals_base_and_magnitude_is_row_norm():
    model = tiny_causal_lm()
    tokens = torch.randint(0, 97, (2, 10))
    base = model(input_ids=tokens).logits
    inject(model, [{"type": "dora", "modalities": ["text"], "targets": ALL_PROJ, "r": 4}])
    torch.testing.assert_close(model(input_ids=tokens).logits, base, atol=1e-6, rtol=0)
    q_proj = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q_proj.mmadapt["dora"].magnitude, q_proj.weight.norm(dim=1))


def test_merge_and_unmerge_restore_weights():
    model = tiny_causal_lm("qwen2")  # q/k/v carry a bias
    tokens = torch.randint(0, 97, (2, 10))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, [{"type": "dora", "modalities": ["text"], "targets": ALL_PROJ, "r": 4, "alpha": 8}])
    _perturb(adapter_parameters(model).values())
    adapted = model(input_ids=tokens).logits
    assert len(merge(model)) == 2 * 7
    torch.testing.assert_close(model(input_ids=tokens).logits, adapted, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        model.model.layers[0].self_attn.q_proj.mmadapt["dora"].merge()
    unmerge(model)
    for name, weight in weights.items():
        torch.testing.assert_close(model.get_parameter(name), weight, atol=1e-6, rtol=0)


def test_matches_peft_dora_in_training_with_dropout():
    """PEFT's DoraLinearLayer with dropout: the base term uses dropout(x) too, the bias is not rescaled."""
    holder = nn.Sequential(nn.Linear(10, 12))
    peft_model = get_peft_model(
        copy.deepcopy(holder), LoraConfig(r=3, lora_alpha=6, lora_dropout=0.3, use_dora=True, target_modules=["0"])
    )
    inject(holder, [{"type": "dora", "modalities": ["text"], "targets": ["0"], "r": 3, "alpha": 6, "dropout": 0.3}])
    ours = holder[0].mmadapt["dora"]
    _perturb(ours.parameters())
    peft_layer = peft_model.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    holder.train(), peft_model.train()
    x = torch.randn(4, 10)
    torch.manual_seed(7)
    got = holder(x)
    torch.manual_seed(7)
    torch.testing.assert_close(got, peft_model(x), atol=1e-6, rtol=0)


def test_exclusive_on_shared_rows():
    model = tiny_causal_lm()
    with pytest.raises(InputError, match="dora rescales the whole weight"):
        inject(
            model,
            [
                {"type": "lora", "modalities": ["text", "image"], "targets": ["q_proj"]},
                {"type": "dora", "modalities": ["image"], "targets": ["q_proj"]},
            ],
        )
    placed = inject(
        tiny_causal_lm(),
        [
            {"type": "lora", "modalities": ["text"], "targets": ["q_proj"]},
            {"type": "dora", "modalities": ["image"], "targets": ["q_proj"]},
        ],
    )
    assert set(placed) == {"lora", "dora"}
