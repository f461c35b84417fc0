"""The adapter contract battery: every registered variant against the same checks.

Modelled on PEFT's ``tests/testing_common.py``: one small spec per registry name
(``BATTERY_SPECS``) on the tiny Llama, then zero init, text-only invariance,
save/load, merge/unmerge, disable, gradient checkpointing and trainable-parameter
checks for each. A new variant that is registered without a spec here fails
``test_every_registered_variant_has_a_spec``. Per-example variants run under
``example_adapters`` with the fixed ``EXAMPLE_INDEX``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmadapt.adapters import (
    ADAPTERS,
    adapter_parameters,
    adapters_of,
    disable_adapters,
    example_adapters,
    inject,
    merge,
    modality_ids,
    unmerge,
)
from mmadapt.compat import set_activation_checkpointing
from mmadapt.errors import InputError
from mmadapt.modality import IMAGE, TEXT
from tests.conftest import tiny_causal_lm
from tests.helpers import one_thread  # noqa: F401  (fixture)

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATTERY_SPECS = {
    "plora": {"type": "plora", "r": 2},
    "lora": {"type": "lora", "r": 2, "alpha": 4},
    "lora_sp": {"type": "lora_sp", "r": 2, "alpha": 4},
    "dora": {"type": "dora", "r": 2, "alpha": 4},
    "miss": {"type": "miss", "r": 4},
    "bone": {"type": "bone", "r": 4},
    "melora": {"type": "melora", "r": 2, "n": 2},
    "loldu": {"type": "loldu", "r": 4},
    "flora_tucker": {"type": "flora_tucker", "r": 2, "ranks": [2, 3], "scale": 2.0},
    "flora_batched": {"type": "flora_batched", "num_adapters": 3, "r": 2},
    "bilora": {"type": "bilora", "r": 2, "alpha": 4},
    "trp": {"type": "trp", "r": 2, "alpha": 4},
    "periodic_lora": {"type": "periodic_lora", "r": 2, "alpha": 4, "stage_steps": 2},
    "prilora": {"type": "prilora", "r": 2, "alpha": 4},
    "allora": {"type": "allora", "r": 2, "eta": 2.0},
    "lora_pro": {"type": "lora_pro", "r": 2, "alpha": 4},
    "flora_opt": {"type": "flora_opt", "r": 2, "kappa": 2},
}
NAMES = sorted(ADAPTERS)  # every registered name, so a variant without a spec fails with KeyError
INIT_ATOL = {"dora": 1e-6}  # m / ||W0|| rounds to 1 +- eps; every other variant starts exactly at the base
NO_MERGED_FORM = {"flora_batched"}  # one adapter per example: merging would apply one to every example

TOKENS = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))  # (B, T)
IMAGE_IDS = torch.full((2, 8), TEXT)
IMAGE_IDS[:, 2:5] = IMAGE  # text before and after an image block
EXAMPLE_INDEX = torch.tensor([2, 0])  # per-example variants: example b uses adapter EXAMPLE_INDEX[b]
pytestmark = pytest.mark.usefixtures("one_thread")


def spec(name: str, modalities: tuple[str, ...] = ("image",), targets: list[str] = ALL_PROJ) -> dict:
    return {**BATTERY_SPECS[name], "modalities": list(modalities), "targets": targets}


def injected(
    name: str, modalities: tuple[str, ...] = ("image",), randomize: bool = True, std: float = 0.2
) -> nn.Module:
    """The tiny Llama (seed 0) with ``name`` on every projection; adapter values randomized
    (normal, ``std``) unless told not to."""
    model = tiny_causal_lm()
    inject(model, [spec(name, modalities)])
    if randomize:
        randomize_adapters(model, std=std)
    return model


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Move every adapter parameter off its (often zero) init, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            nn.init.normal_(param, std=std)


@contextlib.contextmanager
def active(model: nn.Module, ids: torch.Tensor | None) -> Iterator[None]:
    """Modality ids, plus the fixed example index when a per-example adapter is present."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(modality_ids(model, ids))
        if any(adapter.per_example for _, adapter in adapters_of(model)):
            stack.enter_context(example_adapters(model, EXAMPLE_INDEX))
        yield


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with active(model, ids):
        return model(input_ids=TOKENS).logits  # (B, T, V)


@torch.no_grad()
def base_logits() -> torch.Tensor:
    return tiny_causal_lm()(input_ids=TOKENS).logits


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter's state dict entries (parameters and persistent buffers) by full name."""
    return {
        f"{name}.{key}": value for name, adapter in adapters_of(model) for key, value in adapter.state_dict().items()
    }


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    trained = adapter_parameters(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in trained}


def freeze_base(model: nn.Module) -> None:
    trained = adapter_parameters(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)


def test_every_registered_variant_has_a_spec():
    assert set(BATTERY_SPECS) == set(ADAPTERS)
    assert all(entry["type"] == name for name, entry in BATTERY_SPECS.items())  # aliases run under their own name


# ---- 1-2: the base model at init, and on text rows always ------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_zero_init_equals_base(name):
    adapted = logits(injected(name, randomize=False), IMAGE_IDS)
    if name in INIT_ATOL:
        torch.testing.assert_close(adapted, base_logits(), atol=INIT_ATOL[name], rtol=0)
    else:
        assert torch.equal(adapted, base_logits())


@pytest.mark.parametrize("name", NAMES)
def test_text_only_input_is_bit_identical_to_base(name):
    model, base = injected(name), base_logits()
    assert torch.equal(logits(model), base)
    assert torch.equal(logits(model, torch.zeros_like(IMAGE_IDS)), base)
    adapted = logits(model, IMAGE_IDS)
    assert not torch.allclose(adapted, base)
    assert torch.equal(adapted[:, :2], base[:, :2])  # causal: the text before the first image token is untouched


# ---- 3: save -> load --------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_reproduces_logits(name, tmp_path):
    model = injected(name)
    expected = logits(model, IMAGE_IDS)
    path = tmp_path / "adapter.safetensors"
    save_file({key: value.contiguous() for key, value in adapter_state(model).items()}, str(path))

    fresh = injected(name, randomize=False)
    assert not torch.equal(logits(fresh, IMAGE_IDS), expected)
    result = fresh.load_state_dict(load_file(str(path)), strict=False)
    assert result.unexpected_keys == []
    assert not set(result.missing_keys) & set(adapter_state(fresh))
    assert torch.equal(logits(fresh, IMAGE_IDS), expected)


# ---- 4: merge -> unmerge ----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_merge_then_unmerge_text_adapter(name):
    model = injected(name, modalities=("text",))
    before, weights = logits(model), base_weights(model)
    if name in NO_MERGED_FORM:
        with pytest.raises(ValueError, match=rf"{name}: {BATTERY_SPECS[name]['type']} has no exact merged form"):
            merge(model)
        assert all(torch.equal(model.get_parameter(n), w) for n, w in weights.items())
        return
    merged = merge(model)
    assert len(merged) == len(list(adapters_of(model)))
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    unmerge(model)
    for param_name, weight in weights.items():
        torch.testing.assert_close(model.get_parameter(param_name), weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_merge_refuses_image_only_adapter_by_name(name):
    """A merged weight is seen by every token, so only the adapter on text and image rows may merge."""
    model = tiny_causal_lm()
    everywhere = {"type": "lora", "name": "everywhere", "modalities": ["text", "image"], "r": 2, "alpha": 4}
    inject(model, [spec(name, targets=["q_proj", "v_proj"]), {**everywhere, "targets": ["o_proj", "down_proj"]}])
    randomize_adapters(model)
    weights = base_weights(model)
    with pytest.raises(ValueError, match=rf"cannot merge exactly: {name}: "):
        merge(model)
    assert all(torch.equal(model.get_parameter(n), w) for n, w in weights.items())

    with pytest.warns(UserWarning, match=rf"left unmerged: {name}: "):
        merged = merge(model, strict=False)
    assert sorted(merged) == sorted(n for n, _ in adapters_of(model) if n.endswith(".everywhere"))
    for param_name, weight in weights.items():
        changed = not torch.equal(model.get_parameter(param_name), weight)
        assert changed == (param_name.endswith(("o_proj.weight", "down_proj.weight"))), param_name


# ---- 5: disable -------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_disable_adapters_gives_base_logits(name):
    model, base = injected(name), base_logits()
    with disable_adapters(model):
        assert torch.equal(logits(model, IMAGE_IDS), base)
    assert not torch.allclose(logits(model, IMAGE_IDS), base)


# ---- 6-7: training ----------------------------------------------------------------------
def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter gradients of the LM loss; backward runs after the ids block exited and another
    forward (other ids, no grad) ran in between, as with the BLSP-KD teacher pass."""
    model.zero_grad()
    with active(model, IMAGE_IDS):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
    with torch.no_grad(), modality_ids(model, torch.zeros_like(IMAGE_IDS)):
        model(input_ids=TOKENS)
    loss.backward()
    return {n: p.grad.clone() for n, p in adapter_parameters(model).items()}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_gives_same_adapter_grads(name, reentrant):
    model = injected(name).train()
    freeze_base(model)
    reference = adapter_grads(model)
    set_activation_checkpointing(model, use_reentrant=reentrant)
    checkpointed = adapter_grads(model)
    assert checkpointed.keys() == reference.keys()
    assert all(grad.any() for grad in reference.values())
    for param_name in reference:
        torch.testing.assert_close(checkpointed[param_name], reference[param_name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_only_the_adapters_own_parameters_train(name):
    model = tiny_causal_lm().train()
    base_params = dict(model.named_parameters())
    inject(model, [spec(name)])
    randomize_adapters(model)
    trained = adapter_parameters(model)
    assert trained and set(dict(model.named_parameters())) == set(base_params) | set(trained)
    assert not {id(p) for p in trained.values()} & {id(p) for p in base_params.values()}  # no base weight inside
    freeze_base(model)
    with active(model, IMAGE_IDS):
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    assert [n for n, p in base_params.items() if p.grad is not None] == []
    assert [n for n, p in trained.items() if p.grad is None or not p.grad.any()] == []


# Adapter size for the bf16 check: at the battery's 0.2 the random deltas dwarf the 32-wide
# base weights, and bf16 arithmetic moves such logits by up to 20 % (PLoRA, scale 8).
STD_BF16 = 0.05


@pytest.mark.parametrize("name", NAMES)
def test_bf16_parameters_train_like_fp32(name):
    """DeepSpeed's bf16 mode casts the parameters and leaves float buffers in fp32: every
    variant must run forward and backward so, and differ from fp32 arithmetic on the same
    (bf16-representable) values by about what bf16 arithmetic costs the base model."""

    def rounded(low_precision: bool) -> nn.Module:
        model = injected(name, std=STD_BF16).train()
        freeze_base(model)
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.to(torch.bfloat16)
                if not low_precision:
                    param.data = param.data.float()
        return model

    def relative_error(low: torch.Tensor, exact: torch.Tensor) -> float:
        return float((low.float() - exact).norm() / exact.norm())

    results = []
    for model in (rounded(False), rounded(True)):
        with active(model, IMAGE_IDS):
            out = model(input_ids=TOKENS).logits
        out.float().square().mean().backward()
        results.append((out.detach().float(), {n: p.grad for n, p in adapter_parameters(model).items()}))
    (exact_out, exact_grads), (low_out, low_grads) = results
    assert all(grad.dtype == torch.bfloat16 for grad in low_grads.values())
    base = tiny_causal_lm()
    with torch.no_grad():
        exact_base = base(input_ids=TOKENS).logits
        base_error = relative_error(base.to(torch.bfloat16)(input_ids=TOKENS).logits, exact_base)
    assert relative_error(low_out, exact_out) < 3 * base_error
    worst = max(exact_grads, key=lambda n: relative_error(low_grads[n], exact_grads[n]))
    assert relative_error(low_grads[worst], exact_grads[worst]) < 0.1, worst


# ---- 8: stacking ------------------------------------------------------------------------
def layer_outputs(model: nn.Module, layer_names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad(), modality_ids(model, IMAGE_IDS):
        return {name: model.get_submodule(name)(x) for name in layer_names}


def test_plora_on_image_and_dora_on_text_each_fire_on_their_rows():
    image = {"type": "plora", "modalities": ["image"], "targets": ALL_PROJ, "r": 4}
    text = {"type": "dora", "modalities": ["text"], "targets": ALL_PROJ, "r": 2}
    both = tiny_causal_lm()
    placed = inject(both, [image, text])
    randomize_adapters(both)
    state = adapter_state(both)
    singles = {}
    for key, entry in (("plora", image), ("dora", text)):
        singles[key] = tiny_causal_lm()
        inject(singles[key], [entry])
        singles[key].load_state_dict({k: v for k, v in state.items() if f".{key}." in k}, strict=False)

    # Layer by layer (inputs of the right width): image rows get only PLoRA, text rows only DoRA.
    image_rows = (IMAGE_IDS == IMAGE).unsqueeze(-1)  # (B, T, 1)
    for layer_name in placed["plora"]:
        width = both.get_submodule(layer_name).in_features
        x = torch.randn(2, 8, width)
        got = layer_outputs(both, [layer_name], x)[layer_name]
        expected = torch.where(
            image_rows,
            layer_outputs(singles["plora"], [layer_name], x)[layer_name],
            layer_outputs(singles["dora"], [layer_name], x)[layer_name],
        )
        assert torch.equal(got, expected), layer_name
    with torch.no_grad(), modality_ids(both, IMAGE_IDS):
        full = both(input_ids=TOKENS).logits
    assert not torch.allclose(full, logits(singles["plora"], IMAGE_IDS))
    assert not torch.allclose(full, logits(singles["dora"], IMAGE_IDS))


@pytest.mark.parametrize("order", [("dora", "lora"), ("lora", "dora")])
def test_dora_and_lora_on_the_same_rows_are_refused(order):
    entries = [{"type": kind, "modalities": ["image"], "targets": ["q_proj"], "r": 2} for kind in order]
    with pytest.raises(InputError, match=r"(?s)(?=.*dora)(?=.*lora).*rescales the whole weight"):
        inject(tiny_causal_lm(), entries)


def test_two_loras_on_the_same_rows_add_their_deltas():
    model = tiny_causal_lm()
    entries = [{"type": "lora", "modalities": ["image"], "targets": ALL_PROJ, "r": 2, "alpha": 4}] * 2
    placed = inject(model, entries)
    assert set(placed) == {"lora", "lora_2"}
    randomize_adapters(model)
    image_rows = (IMAGE_IDS == IMAGE).unsqueeze(-1)  # (B, T, 1)
    for layer_name in placed["lora"]:
        layer = model.get_submodule(layer_name)
        x = torch.randn(2, 8, layer.in_features)
        with torch.no_grad():
            deltas = layer.mmadapt["lora"](x) + layer.mmadapt["lora_2"](x)  # (B, T, out)
            expected = nn.functional.linear(x, layer.weight, layer.bias) + image_rows * deltas
        got = layer_outputs(model, [layer_name], x)[layer_name]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(deltas, layer.mmadapt["lora"](x).detach())


# ---- 9: export under ZeRO-3 -------------------------------------------------------------
def test_zero3_gathered_state_returns_full_adapter_tensors():
    """A one-process ZeRO-3 engine (CPU, gloo) partitions the adapter; gathering restores it."""
    deepspeed = pytest.importorskip("deepspeed")
    from mmadapt import distributed
    from mmadapt.export import gathered_state

    distributed.init(threads=torch.get_num_threads())  # the single-process environment train.py sets
    model = injected("lora", randomize=True)
    trained = adapter_parameters(model)
    freeze_base(model)
    expected = {name: param.detach().clone() for name, param in trained.items()}
    config = {
        "train_micro_batch_size_per_gpu": 1, "train_batch_size": distributed.world_size(),
        "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(list(trained.values()), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    assert all(param.numel() == 0 for param in trained.values())  # partitioned: no full tensor left locally
    gathered = gathered_state(engine.module, set(trained))
    assert gathered.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(gathered[name], tensor), name


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_no_zero_dim_parameters(name):
    """DeepSpeed broadcasts every parameter viewed as bytes at engine start; 0-dim tensors cannot be viewed so."""
    assert all(p.dim() >= 1 for p in adapter_parameters(injected(name)).values())
