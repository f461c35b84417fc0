"""``mmadapt decompose`` and ``mmadapt prune`` on the embedded SmolLM2-135M (minutes on a CPU).

Run with ``pytest -m "smollm2 and manual" tests/test_prepare_smollm2.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmadapt.cli import main
from mmadapt.config import load_preset
from mmadapt.llm import base_fingerprint, load_llm
from mmadapt.prepare.lord import LowRankLinear, break_even_rank
from mmadapt.prepare.text import HELDOUT, perplexity, read_texts

pytestmark = [pytest.mark.smollm2, pytest.mark.manual]
PRESET = "models/smollm2-vision.yaml"


def load_prepared_folder(out):
    meta = json.loads((out / "prepared.json").read_text())
    loaded = load_llm(load_preset(str(out / "preset.yaml")).llm)
    assert sum(p.numel() for p in loaded.model.parameters()) == meta["parameters"]["after"]
    assert base_fingerprint(loaded.model) == meta["fingerprint"]
    # The perplexity the command reported is the loaded model's.
    score, tokens = perplexity(loaded.model, loaded.tokenizer, read_texts(HELDOUT, "test"))
    assert tokens == meta["perplexity"]["tokens"]
    assert score == pytest.approx(meta["perplexity"]["after"], rel=1e-4)
    assert 1 < meta["perplexity"]["before"] < 100 and math.isfinite(meta["perplexity"]["after"])
    return meta, loaded


def test_decompose_smollm2(tmp_path):
    out = tmp_path / "lord"
    args = ["decompose", "--preset", PRESET, "--out", str(out), "--ratio", "0.9",
            "--targets", "gate_proj", "up_proj", "down_proj"]
    assert main(args) == 0
    meta, loaded = load_prepared_folder(out)
    rank = int(0.9 * break_even_rank(1536, 576))
    assert {spec["rank"] for spec in meta["modules"].values()} == {rank}
    assert len(meta["modules"]) == 30 * 3
    saved = 30 * 3 * (1536 * 576 - rank * (1536 + 576))
    assert meta["parameters"]["before"] - meta["parameters"]["after"] == saved
    assert isinstance(loaded.model.model.layers[7].mlp.up_proj, LowRankLinear)


def test_prune_smollm2(tmp_path):
    out = tmp_path / "pruned"
    args = ["prune", "--preset", PRESET, "--out", str(out), "--ratio", "0.2", "--steps", "10", "--prune-freq", "5",
            "--batch-size", "2", "--seq-len", "64"]
    assert main(args) == 0
    meta, loaded = load_prepared_folder(out)
    layers = loaded.model.model.layers
    prunable = range(3, 29)  # int(30 * 0.1) = 3 frozen at the start, and the last
    assert all(layers[i].mlp.gate_proj.out_features == 1536 - int(1536 * 0.2) for i in prunable)
    assert layers[0].mlp.gate_proj.out_features == layers[29].mlp.gate_proj.out_features == 1536
    assert all(layers[i].self_attn.k_proj.out_features == 192 for i in range(30))  # int(3 kv heads * 0.2) = 0
    ids = loaded.tokenizer("The cat slept in the sun.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(loaded.model.eval()(input_ids=ids).logits).all()
