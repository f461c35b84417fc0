"""The CUDA and bf16 paths, which CI (CPU only) cannot run: skipped without a GPU.

On a GPU machine: ``python -m pytest tests/test_cuda.py``. Covers what the CPU tests
check in fp32, here on the GPU: text-only input runs the base LM (bf16), generation with
the KV cache equals generation without it, ``cif`` equals the float64 CPU result, and
both recipes train under DeepSpeed (one GPU, NCCL, bf16, ZeRO-2 and 3).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import mmadapt
from mmadapt.encoders.cif import cif
from tests import helpers
from tests.helpers import (
    GREEDY_TOKENS, assert_same_greedy, free_port, generation_prompts, greedy, metrics, run_train, shapes_subset,
    speech_subset, tiny_model_with_live_adapters, tiny_overrides,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
# bf16 keeps 8 significant bits (logits of a few units are 1/64 apart) and the cache changes
# the kernels' shapes: allow a few such steps
NEAR_TIE = {torch.float32: helpers.NEAR_TIE, torch.bfloat16: 0.1}


def _tiny(dtype: torch.dtype) -> mmadapt.MultimodalLM:
    return tiny_model_with_live_adapters().to(CUDA, dtype)


def test_text_only_input_is_the_base_llm_in_bf16():
    model = _tiny(torch.bfloat16)
    ids = torch.randint(0, 200, (2, 9), device=CUDA)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.llm(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_generation_with_the_kv_cache_equals_without_on_the_gpu(dtype):
    model = _tiny(dtype)
    prompts = generation_prompts(model)
    for kind in ("image", "speech", "text"):
        item = prompts[kind]
        [cached], [uncached] = greedy(model, [item], True), greedy(model, [item], False)
        assert len(uncached) == GREEDY_TOKENS
        assert_same_greedy(model, item, uncached, cached, f"{kind} prompt on CUDA ({dtype}), cache vs no cache",
                           near_tie=NEAR_TIE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cif_on_the_gpu_equals_float64_on_the_cpu(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 400, 16, generator=generator, dtype=torch.float64)
    alphas = 0.3 * torch.rand(3, 400, generator=generator, dtype=torch.float64)
    alphas[0, 100] = 2.5  # one frame fires three times
    alphas[1, 300:] = 0  # padding
    expected, expected_lengths = cif(hidden, alphas)
    on_gpu, weights = hidden.to(CUDA, dtype).requires_grad_(), alphas.to(CUDA, dtype).requires_grad_()
    tokens, lengths = cif(on_gpu, weights)
    assert torch.equal(lengths.cpu(), expected_lengths)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]  # bf16: the alphas are rounded too
    torch.testing.assert_close(tokens.double().cpu(), expected, rtol=tolerance, atol=tolerance * 4)
    tokens.float().square().sum().backward()  # the CFormer's alphas get gradients in training
    assert all(bool(t.grad.isfinite().all()) for t in (on_gpu, weights))


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("recipe", ["xcomposer", "blsp_kd"])
def test_both_recipes_train_in_bf16_under_deepspeed_on_one_gpu(tmp_path, recipe, stage):
    subset = shapes_subset if recipe == "xcomposer" else speech_subset
    out = tmp_path / "out"
    overrides = tiny_overrides(
        subset(tmp_path / "data"), out, f"deepspeed.zero_stage={stage}", "train.precision=bf16",
        "train.max_steps=4", "train.align_steps=2" if recipe == "blsp_kd" else "train.align_steps=0",
    )
    # the module, not the console script: on a GPU machine deepspeed may be a carried wheel
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", free_port()]
    result = run_train(overrides, launcher, recipe=recipe)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train_rows = [row for row in metrics(out) if "loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2, 3, 4]
    assert all(math.isfinite(row["loss"]) and row["peak_mem_mb"] > 0 for row in train_rows)
    assert (out / "checkpoints" / "step-4" / "COMPLETE").exists()
    assert (out / "adapter" / "adapter.safetensors").exists()
