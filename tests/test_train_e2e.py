"""train.py end to end on the tiny model: outputs, export, resume, text-path invariance."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import mmadapt
from mmadapt.adapters import adapter_parameters
from tests.helpers import REPO, metrics, run_train, shapes_subset, tiny_overrides, train_env

TRAIN_KEYS = {"step", "loss", "lr", "tokens_per_s", "samples_per_s", "peak_mem_mb"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    data = shapes_subset(folder / "data")
    out = folder / "out"
    result = run_train(tiny_overrides(data, out, "train.max_steps=8", "train.save_every=4", "train.lr=5e-3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_outputs_of_a_plain_python_run(finished_run):
    out = finished_run
    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all(TRAIN_KEYS <= r.keys() for r in train_rows)
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert eval_rows and {"eval_loss", "eval_accuracy"} <= eval_rows[-1].keys()
    assert (out / "checkpoints" / "step-8" / "COMPLETE").exists()
    assert (out / "checkpoints" / "step-4" / "COMPLETE").exists()
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "config.yaml").exists() and (out / "base.safetensors").exists()


def test_loaded_run_keeps_text_path_identical_to_base(finished_run):
    model = mmadapt.load_trained(finished_run)
    adapters = adapter_parameters(model.llm)
    assert any(n.endswith("lora_B.weight") and p.abs().sum() > 0 for n, p in adapters.items())
    text = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        adapted = model(input_ids=text).logits
        with mmadapt.disable_adapters(model):
            disabled = model(input_ids=text).logits
        base_llm = mmadapt.build_model(mmadapt.load_config(finished_run / "config.yaml")).llm.eval()
        base = base_llm(input_ids=text).logits
    assert torch.equal(adapted, disabled)
    assert torch.equal(adapted, base)


def test_exported_adapter_holds_every_trained_tensor(finished_run):
    exported = load_file(str(finished_run / "adapter" / "adapter.safetensors"))
    model = mmadapt.build_model(mmadapt.load_config(finished_run / "config.yaml"))
    groups = model.parameter_groups()
    expected = {n for g in ("adapters", "projector", "vision") for n in groups[g]}
    assert set(exported) == expected
    for name, tensor in exported.items():
        assert tensor.shape == dict(model.named_parameters())[name].shape


def test_existing_output_without_resume_is_an_error(finished_run):
    result = run_train(["model=models/tiny.yaml", f"train.output_dir={finished_run}"])
    assert result.returncode == 2
    assert "already exists and train.resume=none" in result.stderr.strip().splitlines()[-1]


def test_killed_run_resumes_with_identical_losses(tmp_path):
    data = shapes_subset(tmp_path / "data")
    args = ("train.max_steps=30", "train.save_every=4", "train.lr=5e-3", "data.eval=null")
    reference = tmp_path / "reference"
    assert run_train(tiny_overrides(data, reference, *args)).returncode == 0

    resumed = tmp_path / "resumed"
    command = [sys.executable, "train.py", "--config", "configs/xcomposer.yaml", *tiny_overrides(data, resumed, *args)]
    process = subprocess.Popen(command, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (resumed / "checkpoints" / "step-8" / "COMPLETE").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before its step-8 checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / "adapter").exists(), "the run finished before it could be killed"

    result = run_train(tiny_overrides(data, resumed, *args, "train.resume=auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(resumed)] == list(range(1, 31))
    expected = [r["loss"] for r in metrics(reference)]
    assert [r["loss"] for r in metrics(resumed)] == pytest.approx(expected, rel=1e-6, abs=1e-7)
