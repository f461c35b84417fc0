import pytest
import torch
from torch import nn

from mmadapt.adapters import adapter_parameters, adapters_of, disable_adapters, inject, merge, modality_ids, parse_spec
from mmadapt.adapters.flora_batched import FloraBatched
from mmadapt.compat import cache_argument
from mmadapt.errors import InputError
from mmadapt.modality import IMAGE, TEXT, example_adapters
from tests.conftest import tiny_causal_lm

MODES = ["multiplicative", "additive"]
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def injected(mode: str, modalities: list[str], num_adapters: int = 3, randomize: bool = True) -> nn.Module:
    model = tiny_causal_lm()
    spec = {"type": "flora_batched", "mode": mode, "modalities": modalities, "targets": ALL_PROJ}
    inject(model, [spec | {"num_adapters": num_adapters, "r": 2, "alpha": 4}])  # s = 2
    if randomize:
        torch.manual_seed(1)
        for param in adapter_parameters(model).values():
            nn.init.normal_(param, std=0.3)
    return model


def explicit_weight(adapter: FloraBatched, k: int) -> torch.Tensor:
    """W_k written out from the spec sheet, not from the adapter's code."""
    w0, low_rank = adapter.base_layer.weight, adapter.lora_B[k] @ adapter.lora_A[k]
    if adapter.spec.mode == "multiplicative":
        return w0 + 2 * w0 * low_rank
    return w0 + 2 * low_rank


@pytest.mark.parametrize("mode", MODES)
def test_batched_rows_equal_per_example_loop_with_explicit_weights(mode):
    model = injected(mode, ["image"])
    layer = model.model.layers[1].mlp.gate_proj
    adapter = layer.mmadapt["flora_batched"]
    x = torch.randn(4, 10, 32)
    ids = torch.full((4, 10), TEXT)
    ids[0, 2:6] = ids[1, 5:] = ids[2, :] = IMAGE  # example 3 has no image rows
    index = torch.tensor([2, 0, 2, 1])
    with modality_ids(model, ids), example_adapters(model, index):
        batched = layer(x)
    for b, k in enumerate(index.tolist()):
        adapted = x[b] @ explicit_weight(adapter, k).T
        expected = torch.where((ids[b] == IMAGE).unsqueeze(-1), adapted, x[b] @ layer.weight.T)
        torch.testing.assert_close(batched[b], expected)
        torch.testing.assert_close(adapter.delta_weight_of(k), explicit_weight(adapter, k) - layer.weight)
    assert not torch.allclose(batched[0], x[0] @ layer.weight.T)


@pytest.mark.parametrize("mode", MODES)
def test_zero_init_is_the_base_model(mode):
    model = injected(mode, ["text"], randomize=False)
    tokens = torch.randint(0, 97, (3, 8))
    with disable_adapters(model):
        base = model(input_ids=tokens).logits
    with example_adapters(model, torch.tensor([0, 2, 1])):
        assert torch.equal(model(input_ids=tokens).logits, base)


@pytest.mark.parametrize("mode", MODES)
def test_all_equal_ids_equal_the_single_adapter_model(mode):
    model = injected(mode, ["text"])
    tokens = torch.randint(0, 97, (2, 8))
    with example_adapters(model, torch.tensor([1, 1])):
        batched = model(input_ids=tokens).logits
    adapters = [adapter for _, adapter in adapters_of(model)]
    with torch.no_grad(), disable_adapters(model):
        for adapter in adapters:  # the model with only adapter 1, merged by hand
            adapter.base_layer.weight += adapter.delta_weight_of(1)
        single = model(input_ids=tokens).logits
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_loss_on_one_example_trains_only_its_adapter(mode):
    model = injected(mode, ["text"])
    tokens = torch.randint(0, 97, (4, 8))
    with example_adapters(model, torch.tensor([0, 1, 2, 1])):
        logits = model(input_ids=tokens).logits
    logits[1].square().mean().backward()  # example 1 uses adapter 1
    for name, param in adapter_parameters(model).items():
        assert param.grad[1].abs().sum() > 0, name
        assert torch.equal(param.grad[[0, 2]], torch.zeros_like(param.grad[[0, 2]])), name


@pytest.mark.parametrize("mode", MODES)
def test_generation_one_token_steps_match_per_example_runs(mode):
    model = injected(mode, ["text"])
    tokens = torch.randint(3, 97, (2, 6))
    index = torch.tensor([2, 0])
    with example_adapters(model, index):
        full = model(input_ids=tokens).logits[:, -1]
        cache = model(input_ids=tokens[:, :-1], use_cache=True).past_key_values
        step = model(input_ids=tokens[:, -1:], **{cache_argument(type(model)): cache}).logits[:, -1]  # [B, 1, d] inputs
        generated = model.generate(tokens, max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    for b in range(2):
        with example_adapters(model, index[b : b + 1]):
            alone = model.generate(tokens[b : b + 1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(generated[b], alone[0])


def test_errors():
    model = injected("multiplicative", ["text"])
    tokens = torch.randint(0, 97, (2, 8))
    with pytest.raises(RuntimeError, match=r"needs example_adapters\(model, index\)"):
        model(input_ids=tokens)
    with example_adapters(model, torch.tensor([0, 1, 2])):
        with pytest.raises(RuntimeError, match="got 3 indices for a batch of 2"):
            model(input_ids=tokens)
    with pytest.raises(ValueError, match="flora_batched has no exact merged form"):
        merge(model)
    with pytest.raises(InputError, match="nn.Linear layers only, not Conv2d"):
        FloraBatched(nn.Conv2d(4, 4, 3), parse_spec({"type": "flora_batched", "num_adapters": 2}))
    with pytest.raises(ValueError, match="num_adapters"):
        parse_spec({"type": "flora_batched"})
    with pytest.raises(ValueError, match="greater than 0"):
        parse_spec({"type": "flora_batched", "num_adapters": 0})
    with pytest.raises(ValueError, match="'multiplicative' or 'additive'"):
        parse_spec({"type": "flora_batched", "num_adapters": 2, "mode": "hadamard"})
