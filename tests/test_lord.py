"""LoRD (mmadapt.prepare.lord), the prepared-model folder and ``mmadapt decompose`` on tiny models."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import yaml
from torch import nn

from mmadapt.adapters import inject, merge, modality_ids
from mmadapt.cli import main
from mmadapt.config import load_preset
from mmadapt.errors import InputError
from mmadapt.llm import LLMConfig, base_fingerprint, load_llm
from mmadapt.modality import IMAGE
from mmadapt.prepare.lord import (
    LowRankLinear,
    break_even_rank,
    covariance_root,
    decompose,
    decompose_linear,
    factored_parameters,
    input_covariances,
    plan_ranks,
)
from mmadapt.prepare.text import CALIBRATION, HELDOUT, packed_batches, read_texts
from tests.conftest import tiny_causal_lm
from tests.helpers import REPO

PLORA = {"type": "plora", "modalities": ["image"], "targets": ["q_proj", "v_proj", "down_proj"], "r": 4, "alpha": 8}


def write_tiny_preset(folder) -> str:
    """``models/tiny.yaml`` with a 4-layer LLM (the first 10 % and the last are never pruned)."""
    preset = yaml.safe_load((REPO / "models" / "tiny.yaml").read_text())
    preset["llm"]["config"]["num_hidden_layers"] = 4
    path = folder / "tiny4.yaml"
    path.write_text(yaml.safe_dump(preset))
    return str(path)


def small_text_sets(folder) -> list[str]:
    """``--heldout`` and ``--calibration`` options naming the first records of the bundled sets
    (the byte tokenizer makes the full sets slow to score on a busy CPU)."""
    options = []
    for option, source, count in (("--heldout", HELDOUT, 4), ("--calibration", CALIBRATION, 6)):
        path = folder / source.name
        path.write_text("".join(source.read_text().splitlines(keepends=True)[:count]))
        options += [option, str(path)]
    return options


def layer_and_inputs(out_features: int, in_features: int, rows: int = 200, seed: int = 0):
    """A linear layer and inputs with very unequal variance per input direction."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, dtype=torch.float64)
    scales = torch.logspace(1, -2, in_features, dtype=torch.float64)
    x = torch.randn(rows, in_features, dtype=torch.float64) * scales  # (N, in)
    return layer, x


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10, 10)])
@pytest.mark.parametrize("data_aware", [False, True])
def test_full_rank_reproduces_the_layer(shape, data_aware):
    layer, x = layer_and_inputs(*shape)
    root = covariance_root(x.T @ x) if data_aware else None
    factored = decompose_linear(layer, min(shape), root)
    assert isinstance(factored, LowRankLinear) and factored.up.bias is not None
    torch.testing.assert_close(factored(x), layer(x), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(factored.weight, layer.weight, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_data_free_error_is_the_sum_of_discarded_squared_singular_values(rank):
    layer, _ = layer_and_inputs(9, 7)
    factored = decompose_linear(layer, rank)
    sigma = torch.linalg.svdvals(layer.weight.detach())
    error = (layer.weight - factored.weight).pow(2).sum()
    torch.testing.assert_close(error, sigma[rank:].pow(2).sum(), atol=1e-10, rtol=1e-9)


def test_data_aware_error_on_calibration_is_at_most_the_svd_error():
    layer, x = layer_and_inputs(10, 16)
    root = covariance_root(x.T @ x)
    strictly_better = 0
    for rank in range(1, 10):
        aware = (layer(x) - decompose_linear(layer, rank, root)(x)).norm()
        svd = (layer(x) - decompose_linear(layer, rank)(x)).norm()
        assert aware <= svd * (1 + 1e-9)
        strictly_better += bool(aware < 0.99 * svd)
    assert strictly_better >= 5  # the inputs are anisotropic, so using them must pay off


def test_input_covariances_sum_each_layers_inputs_and_share_equal_inputs():
    model = tiny_causal_lm()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    batches = [torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (3, 5))]
    seen = {name: [] for name in names}

    def record(name, _, args):
        seen[name].append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [model.get_submodule(n).register_forward_pre_hook(partial(record, n)) for n in names]
    covariances = input_covariances(model, names, batches)
    for handle in handles:
        handle.remove()
    for name in names:
        x = torch.cat(seen[name])
        torch.testing.assert_close(covariances[name], x.T @ x, rtol=1e-5, atol=1e-5)
    assert covariances[names[0]] is covariances[names[1]]  # q and k read one tensor
    assert covariances[names[2]] is not covariances[names[0]]


def test_parameter_count_matches_the_formula_and_only_shrinking_layers_are_replaced():
    model = tiny_causal_lm()  # hidden 32, intermediate 64, 2 kv heads of 8: q/o 32x32, k/v 16x32, mlp 64x32
    before = sum(p.numel() for p in model.parameters())
    ranks = plan_ranks(model, rank=12)
    # break-even: q/o 16, k/v 10.7, gate/up/down 21.3 -> rank 12 replaces all but k/v
    replaced_kinds = {name.rsplit(".", 1)[1] for name in ranks}
    assert replaced_kinds == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    dense = {name: model.get_submodule(name) for name in ranks}
    decompose(model, ranks)
    saved = sum(
        m.out_features * m.in_features - factored_parameters(m.out_features, m.in_features, 12, False)
        for m in dense.values()
    )
    assert sum(p.numel() for p in model.parameters()) == before - saved
    for name, layer in dense.items():
        new = model.get_submodule(name)
        assert isinstance(new, LowRankLinear) and new.rank == 12
        assert sum(p.numel() for p in new.parameters()) == 12 * (layer.in_features + layer.out_features)
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear


def test_ratio_picks_the_rank_from_the_break_even_rank():
    model = tiny_causal_lm()
    ranks = plan_ranks(model, targets=["gate_proj", "k_proj"], ratio=0.5)
    assert ranks["model.layers.1.mlp.gate_proj"] == int(0.5 * break_even_rank(64, 32)) == 10
    assert ranks["model.layers.1.self_attn.k_proj"] == int(0.5 * break_even_rank(16, 32)) == 5
    assert len(ranks) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 22}, "makes none of the 14 targeted layers smaller"),
        ({"rank": 0}, "--rank must be at least 1"),
        ({"ratio": 1.0}, "in (0, 1)"),
        ({"rank": 4, "ratio": 0.5}, "exactly one of --rank and --ratio"),
        ({"rank": 4, "targets": ["nope_proj"]}, "match no linear layer"),
    ],
)
def test_plan_ranks_rejects_bad_sizes(kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_ranks(tiny_causal_lm(), **kwargs)


def test_plora_on_a_decomposed_model_keeps_text_logits_and_adapts_image_rows():
    model = tiny_causal_lm()
    decompose(model, plan_ranks(model, ratio=0.5))
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    placed = inject(model, [PLORA])
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in placed["plora"])
    assert len(placed["plora"]) == 6  # q, v, down in 2 layers: the factored layers keep their names
    for name in placed["plora"]:
        nn.init.normal_(model.get_submodule(name).mmadapt["plora"].lora_B.weight)
    modality = torch.zeros_like(ids)
    modality[:, 2:4] = IMAGE
    with torch.no_grad():
        text_only = model(input_ids=ids).logits
        with modality_ids(model, modality):
            mixed = model(input_ids=ids).logits
    assert torch.equal(text_only, base)  # bit for bit
    assert torch.equal(mixed[:, :2], base[:, :2])  # causal: rows before the first image row are untouched
    assert not torch.allclose(mixed[:, 2:], base[:, 2:])

    # The delta is LoRA's on the layer's input: the same as on a dense layer holding U V.
    layer = model.get_submodule(placed["plora"][0])
    x = torch.randn(5, layer.in_features)
    adapter = layer.mmadapt["plora"]
    dense = nn.Linear(layer.in_features, layer.out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            adapter(x), adapter.scaling * x @ adapter.lora_A.weight.T @ adapter.lora_B.weight.T
        )


def test_merge_refuses_an_adapter_on_a_factored_layer():
    model = tiny_causal_lm()
    decompose(model, plan_ranks(model, ratio=0.5))
    inject(model, [{**PLORA, "modalities": ["text"]}])
    with pytest.raises(ValueError, match="LoRD-factored layer"):
        merge(model)


def test_decompose_command_writes_a_loadable_folder(tmp_path, capsys):
    preset = write_tiny_preset(tmp_path)
    out = tmp_path / "lord"
    texts = small_text_sets(tmp_path)
    assert main(["decompose", "--preset", preset, "--out", str(out), "--ratio", "0.5", "--seq-len", "64", *texts]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "prepared.json").read_text())
    assert meta["method"] == "lord" and meta["settings"]["data_free"] is False
    assert len(meta["modules"]) == 28 and all(spec["type"] == "low_rank" for spec in meta["modules"].values())
    assert f"parameters: {meta['parameters']['before']:,} -> {meta['parameters']['after']:,}" in printed
    assert f"{meta['perplexity']['after']:.3f}" in printed

    loaded = load_llm(load_preset(str(out / "preset.yaml")).llm)
    assert loaded.pretrained_source == str(out.resolve())
    assert sum(p.numel() for p in loaded.model.parameters()) == meta["parameters"]["after"]
    assert base_fingerprint(loaded.model) == meta["fingerprint"]
    assert loaded.tokenizer.chat_template and len(loaded.tokenizer) == 259
    down = loaded.model.get_submodule("model.layers.2.mlp.down_proj")
    assert isinstance(down, LowRankLinear) and down.rank == meta["modules"]["model.layers.2.mlp.down_proj"]["rank"]

    # The source model factored the same way in memory gives the folder's model.
    source = load_llm(load_preset(preset).llm, seed=0)
    assert base_fingerprint(source.model) == meta["source"]["fingerprint"]
    ranks = plan_ranks(source.model, ratio=0.5)
    batches = packed_batches(source.tokenizer, read_texts(texts[3], "test"), 64, 8, "test")
    decompose(source.model, ranks, input_covariances(source.model, ranks, batches))
    assert base_fingerprint(source.model) == meta["fingerprint"]
    ids = torch.randint(0, 259, (2, 11))
    with torch.no_grad():
        assert torch.equal(source.model.eval()(input_ids=ids).logits, loaded.model.eval()(input_ids=ids).logits)


def test_data_free_decompose_needs_no_calibration_and_matches_truncated_svd(tmp_path):
    preset = write_tiny_preset(tmp_path)
    out = tmp_path / "svd"
    args = ["decompose", "--preset", preset, "--out", str(out), "--rank", "8", "--data-free", "--targets", "gate_proj",
            *small_text_sets(tmp_path)[:2], "--calibration", str(tmp_path / "missing.jsonl")]
    assert main(args) == 0
    source = load_llm(load_preset(preset).llm, seed=0).model
    loaded = load_llm(LLMConfig(source="prepared", path=str(out))).model
    for index in range(4):
        dense = source.model.layers[index].mlp.gate_proj.weight.detach()
        u, s, vh = torch.linalg.svd(dense.double())
        truncated = (u[:, :8] * s[:8]) @ vh[:8]
        factored = loaded.model.layers[index].mlp.gate_proj.weight
        torch.testing.assert_close(factored.double(), truncated, atol=1e-5, rtol=1e-5)
    assert type(loaded.model.layers[0].mlp.up_proj) is nn.Linear


def test_prepared_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llm(LLMConfig(source="prepared", path=str(tmp_path / "none")))
    with pytest.raises(InputError, match="not a prepared model folder"):
        load_llm(LLMConfig(source="prepared", path=str(tmp_path)))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "models/no-such.yaml", "--ratio", "0.5"], "model preset 'models/no-such.yaml' not found"),
        (["--rank", "500"], "--rank 500 makes none of the 28 targeted layers smaller"),
        (["--ratio", "1.5"], "--ratio is the fraction of parameters kept, in (0, 1); got 1.5"),
        (["--ratio", "0.5", "--calibration", "nowhere.jsonl"], "--calibration: text file nowhere.jsonl does not exist"),
    ],
)
def test_decompose_bad_input_is_one_clear_line(tmp_path, capsys, extra, message):
    preset = ["--preset", write_tiny_preset(tmp_path)] if "--preset" not in extra else []
    assert main(["decompose", *preset, "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_decompose_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    args = ["decompose", "--preset", write_tiny_preset(tmp_path), "--out", str(tmp_path / "out"), "--rank", "4"]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_text_sets_name_the_bad_record(tmp_path):
    path = tmp_path / "calibration.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "txt": "typo"}\n')
    with pytest.raises(InputError, match=r"calibration.jsonl:2 \(id='b'\): needs a non-empty string field 'text'"):
        read_texts(path, "--calibration")
    path.write_text("\n")
    with pytest.raises(InputError, match="holds no text records"):
        read_texts(path, "--calibration")
