"""Shared test helpers: a small slice of the shapes data and train.py runs on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "data" / "shapes"
SPEECH = REPO / "data" / "speech"
# Set by an in-process run in another test; a subprocess must start its own process group.
LAUNCHER_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
TINY = [
    "model=models/tiny.yaml", "data.max_length=512", "train.log_every=1", "train.align_steps=0",
    "train.batch_size=4", "eval.batch_size=8",
]


def tiny_model_with_live_adapters():
    """The tiny preset in eval mode with every PLoRA B random: B starts at zero, which would
    hide the adapters from a test of what they change. The output head is untied so that
    greedy answers depend on the input (see tests/test_chat.py)."""
    import torch

    import mmadapt
    from mmadapt.adapters import adapter_parameters

    cfg = mmadapt.load_config(
        REPO / "configs" / "xcomposer.yaml", ["model=models/tiny.yaml", "model.llm.config.tie_word_embeddings=false"]
    )
    model = mmadapt.build_model(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapter_parameters(model.llm).items():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


GREEDY_TOKENS = 16  # answer length of the generation tests
GENERATION_PROMPTS = {  # kind: (user text, images, audios)
    "image": ("<image>\nDescribe the picture.", 1, 0),
    "speech": ("<speech>", 0, 1),
    "text": ("Name three colours.", 0, 0),
    "image+speech": ("<image>\n<speech>\nAnswer the question about the picture.", 1, 1),
}


def generation_prompts(model) -> dict[str, dict]:
    """One ``prompt_item`` per kind of :data:`GENERATION_PROMPTS`: a shapes picture, 0.75 s of noise."""
    import numpy as np
    import torch

    from mmadapt.data.tokenize import encode_prompt
    from mmadapt.inference.prompts import load_image, prompt_item

    image = load_image(model, SHAPES / "images" / "test-00000.png")
    waveform = torch.from_numpy((0.1 * np.random.default_rng(0).standard_normal(12000)).astype(np.float32))
    features = model.encoders["speech"].features(waveform)
    image_tokens = model.encoders["image"].num_tokens
    items = {}
    for kind, (content, images, audios) in GENERATION_PROMPTS.items():
        ids = encode_prompt(model.tokenizer, [{"role": "user", "content": content}], image_tokens, "")
        items[kind] = prompt_item(kind, ids, [image] * images, [features] * audios)
    return items


def greedy(model, items: list[dict], use_cache: bool = True) -> list[list[int]]:
    """Greedy answers of :data:`GREEDY_TOKENS` tokens to a left-padded batch, on the model's device."""
    import torch

    from mmadapt.data.collate import Collator
    from mmadapt.evaluate import generation_inputs

    device = next(model.parameters()).device
    batch = generation_inputs(Collator(model.tokenizer.pad_token_id, padding_side="left")(items))
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    return model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, use_cache=use_cache).tolist()


def shapes_subset(folder: Path, n_train: int = 32, n_test: int = 8) -> dict[str, Path]:
    """Write the first records of the shapes splits to ``folder`` with absolute image paths."""
    return _subset(SHAPES, "images", folder, n_train, n_test)


def speech_subset(folder: Path, n_train: int = 16, n_test: int = 8) -> dict[str, Path]:
    """Write the first records of the bundled speech splits to ``folder`` with absolute audio paths."""
    return _subset(SPEECH, "audios", folder, n_train, n_test)


def _subset(source: Path, files: str, folder: Path, n_train: int, n_test: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", n_train), ("test", n_test)):
        lines = (source / f"{split}.jsonl").read_text().splitlines()[:count]
        records = [json.loads(line) for line in lines]
        for record in records:
            record[files] = [str(source / p) for p in record[files]]
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def tiny_overrides(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.train={data['train']}", f"data.eval={data['test']}", f"train.output_dir={out}", *extra]


def run_train(
    overrides: list[str], launcher: list[str] | None = None, timeout: int = 600, recipe: str = "xcomposer"
) -> subprocess.CompletedProcess:
    """Run ``train.py`` with a recipe as a subprocess (plain python unless a launcher is given)."""
    command = [*(launcher or [sys.executable]), "train.py", "--config", f"configs/{recipe}.yaml", *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=train_env())


def train_env() -> dict[str, str]:
    """This environment without a launcher's variables (an in-process run may have set them)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    return env


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def deepspeed_launcher(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), *args]


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: a second one gains nothing on such small
    matrices, and stalls every op when other processes share the CPUs (10x-50x here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NEAR_TIE = 1e-4  # top-2 logit gap below which two greedy decodings may rightly part ways


def assert_same_greedy(
    model, item: dict, expected: list[int], actual: list[int], what: str, near_tie: float = NEAR_TIE
) -> None:
    """Two greedy decodings of one prompt agree token for token, or part at a near-tie.

    ``item`` is the prompt as a ``prompt_item`` dict and ``expected`` the reference decoding.
    Where they first differ, the reference's logits there (one forward over the prompt and
    the tokens both chose before) must have a top-2 gap below ``near_tie``; such a
    step is reported with a warning, anything else fails naming the gap.
    """
    import warnings

    import torch

    from mmadapt.data.collate import Collator
    from mmadapt.evaluate import generation_inputs

    if expected == actual:
        return
    step = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), min(len(expected), len(actual)))
    device = next(model.parameters()).device
    batch = generation_inputs(Collator(model.tokenizer.pad_token_id, padding_side="left")([item]))
    inputs = {key: value.to(device) for key, value in batch.items()}
    chosen = torch.tensor([expected[:step]], dtype=torch.long, device=device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], chosen], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        top2 = model(**inputs).logits[0, -1].float().topk(2).values
    gap = float(top2[0] - top2[1])
    detail = f"{what}: decodings part at step {step} (top-2 logit gap {gap:.2e}): {expected} vs {actual}"
    assert gap < near_tie, detail
    warnings.warn(f"near-tie, accepted: {detail}", stacklevel=2)


def incomplete_run(run: Path, folder: Path) -> Path:
    """A copy of a run folder with only its config: not a finished run."""
    folder.mkdir()
    shutil.copy(run / "config.yaml", folder)
    return folder


def run_of_another_base(run: Path, folder: Path) -> Path:
    """A copy of a finished run whose recorded base-weight fingerprint no longer matches."""
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    meta_path = folder / "adapter" / "adapter_config.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "base_fingerprint": "0" * 16}))
    return folder
