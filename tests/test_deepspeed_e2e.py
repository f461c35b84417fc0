"""Two DeepSpeed ranks on this machine: ZeRO-2, ZeRO-3 with full export, and a hostfile launch."""

import os
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

import mmadapt
from tests.helpers import deepspeed_launcher, free_port, metrics, run_train, shapes_subset, speech_subset, tiny_overrides

pytestmark = pytest.mark.deepspeed_launch


def _two_rank_run(tmp_path, stage: int, *launcher_args: str):
    data = shapes_subset(tmp_path / "data")
    out = tmp_path / "out"
    overrides = tiny_overrides(data, out, f"deepspeed.zero_stage={stage}", "train.max_steps=8", "train.lr=5e-3")
    port = free_port()
    result = run_train(overrides, launcher=deepspeed_launcher(*launcher_args, "--master_port", port))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not leaked, f"DeepSpeed's shared-memory all-reduce buffers outlived the run: {leaked}"
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 9))
    assert (out / "checkpoints" / "step-8" / "COMPLETE").exists()
    assert (out / "checkpoints" / "step-8" / "rng_rank1.pt").exists(), "second rank did not run"
    assert (out / "adapter" / "adapter.safetensors").exists()
    return out


def test_zero2_two_ranks(tmp_path):
    _two_rank_run(tmp_path, 2, "--num_gpus", "2")


def test_zero3_exports_full_gathered_weights_that_reproduce_the_model(tmp_path):
    out = _two_rank_run(tmp_path, 3, "--num_gpus", "2")
    exported = load_file(str(out / "adapter" / "adapter.safetensors"))
    trained = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step-8")
    for name, tensor in exported.items():
        assert tensor.numel() > 0 and torch.equal(tensor, trained[name]), name
    assert any(n.endswith("lora_B.weight") and t.abs().sum() > 0 for n, t in exported.items())

    loaded = mmadapt.load_trained(out)
    reference = mmadapt.build_model(mmadapt.load_config(out / "config.yaml"))
    reference.load_state_dict(trained, strict=False)
    reference.eval()
    ids = torch.tensor([[5, -1, -1, -1, -1, -1, -1, -1, -1, -1, 7, 9]])
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, images=pixels).logits, reference(ids, images=pixels).logits, rtol=0, atol=0)


def test_hostfile_with_two_localhost_slots(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # One host in the file means a local launch; a real cluster also needs passwordless ssh (README).
    _two_rank_run(tmp_path, 2, "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1")


@pytest.mark.parametrize("stage", [2, 3])
def test_blsp_kd_two_ranks(tmp_path, stage):
    data = speech_subset(tmp_path / "data")
    out = tmp_path / "out"
    overrides = tiny_overrides(data, out, f"deepspeed.zero_stage={stage}", "train.max_steps=8", "train.align_steps=3")
    result = run_train(overrides, deepspeed_launcher("--num_gpus", "2", "--master_port", free_port()), recipe="blsp_kd")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all({"loss_align", "loss_quantity"} <= set(r) for r in train_rows[:3])
    assert all({"loss_kd", "loss_input_kl", "loss_quantity"} <= set(r) for r in train_rows[3:])
    [final] = [r for r in rows if "eval_loss" in r]
    assert 0 <= final["eval_kd_top1"] <= 1 and 0 <= final["eval_cif_len_within1"] <= 1
    assert (out / "checkpoints" / "step-8" / "rng_rank1.pt").exists(), "second rank did not run"
    exported = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert any(n.startswith("encoders.speech.") for n in exported)
    assert any(n.startswith("projectors.speech.cformer.") for n in exported)
    assert any(".mmadapt." in n and t.abs().sum() > 0 for n, t in exported.items())
