"""LoRAPrune (mmadapt.prepare.loraprune) and ``mmadapt prune`` on tiny Llama models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from mmadapt.adapters import adapter_parameters, inject, merge
from mmadapt.adapters.lora import LoRA
from mmadapt.adapters.registry import parse_spec
from mmadapt.build import build_model
from mmadapt.cli import main
from mmadapt.config import load_config, load_preset
from mmadapt.errors import InputError
from mmadapt.llm import base_fingerprint, load_llm
from mmadapt.prepare import loraprune
from mmadapt.prepare.loraprune import (
    Member,
    PruneSettings,
    copy_adapted_weights,
    cubic_sparsity,
    cut_pruned,
    element_importance,
    group_importance,
    group_sets,
    lora_gradient_estimate,
    lora_prune,
    mask_outputs,
    train_masks,
)
from tests.conftest import tiny_causal_lm
from tests.helpers import REPO
from tests.test_lord import small_text_sets, write_tiny_preset


def tiny_llama(layers: int = 4, seed: int = 0):
    """A random Llama with GQA (4 query heads over 2 kv heads of size 8), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def batches(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2, 12), generator=generator) for _ in range(count)]


def test_cubic_schedule_follows_the_formula():
    def schedule(step):
        return cubic_sparsity(step, 100, 0.1, 0.5, 0.1, 0.1)

    assert schedule(0) == schedule(10) == 0.1  # warm-up keeps init_ratio
    assert schedule(91) == schedule(99) == 0.5  # cool-down holds the target
    # between: ratio + (init - ratio) * (1 - (t - 10) / 80) ** 3
    assert schedule(50) == pytest.approx(0.5 - 0.4 * 0.5**3)
    assert schedule(11) == pytest.approx(0.5 - 0.4 * (79 / 80) ** 3)
    assert schedule(90) == pytest.approx(0.5)
    values = [schedule(t) for t in range(100)]
    assert values == sorted(values)


def test_groups_skip_the_first_tenth_and_the_last_layer_and_keep_gqa_whole():
    sets = group_sets(tiny_llama(layers=12))
    assert sorted({s.layer for s in sets}) == list(range(1, 11))  # int(12 * 0.1) = 1
    attention = next(s for s in sets if s.kind == "attention")
    assert attention.mask.numel() == 2  # one group per kv head
    blocks = {m.name.rsplit(".", 1)[1]: (m.block, m.fan_in) for m in attention.members}
    assert blocks == {"q_proj": (16, False), "k_proj": (8, False), "v_proj": (8, False), "o_proj": (16, True)}
    assert sorted({s.layer for s in group_sets(tiny_llama(layers=4))}) == [0, 1, 2]


def test_non_llama_or_too_shallow_models_are_refused():
    with pytest.raises(InputError, match="needs Llama-style decoder layers"):
        group_sets(tiny_causal_lm("gpt_neox"))
    with pytest.raises(InputError, match="has 1 decoder layers"):
        group_sets(tiny_llama(layers=1))


def test_gradient_estimate_and_importance_match_a_hand_computation():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, dtype=torch.float64)
    adapter = LoRA(layer, parse_spec({"type": "lora", "r": 3, "alpha": 5.0}))
    adapter.double()
    nn.init.normal_(adapter.lora_B.weight)
    x = torch.randn(9, 6, dtype=torch.float64)
    (layer(x) + adapter(x)).sin().sum().backward()
    a, b = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    grad_a, grad_b = adapter.lora_A.weight.grad, adapter.lora_B.weight.grad

    by_hand = torch.zeros(4, 6, dtype=torch.float64)
    for i in range(4):
        for j in range(6):
            for k in range(3):
                by_hand[i, j] += grad_b[i, k] * a[k, j] + b[i, k] * grad_a[k, j] - grad_b[i, k] * grad_a[k, j]
    torch.testing.assert_close(lora_gradient_estimate(a, b, grad_a, grad_b), by_hand)

    merged = layer.weight.detach() + adapter.scaling * b @ a
    element = element_importance(layer, adapter)
    torch.testing.assert_close(element, (by_hand * merged).abs())

    rows = group_importance(element, Member("x", block=2, fan_in=False))
    expected = torch.stack([element[0:2].sum(), element[2:4].sum()])
    torch.testing.assert_close(rows, expected / expected.norm())
    columns = group_importance(element, Member("x", block=3, fan_in=True))
    expected = torch.stack([element[:, 0:3].sum(), element[:, 3:6].sum()])
    torch.testing.assert_close(columns, expected / expected.norm())


def test_masked_outputs_are_exactly_zero():
    model = tiny_llama()
    sets = group_sets(model)
    inject(model, [{"type": "lora", "modalities": ["text"], "r": 2}])
    for param in adapter_parameters(model).values():
        nn.init.normal_(param)  # a LoRA delta on every row, which the mask must zero too
    for group_set in sets:
        group_set.mask[:: 2] = 0.0
    mask_outputs(model, sets)
    outputs, inputs = {}, {}
    for group_set in sets:
        for member in group_set.members:
            module = model.get_submodule(member.name)
            module.register_forward_hook(lambda m, args, out, n=member.name: outputs.__setitem__(n, out))
            module.register_forward_pre_hook(lambda m, args, n=member.name: inputs.__setitem__(n, args[0]))
    with torch.no_grad():
        model(input_ids=batches(1)[0])
    for group_set in sets:
        dead = ~group_set.mask.bool()
        for member in group_set.members:
            seen = (inputs if member.fan_in else outputs)[member.name]  # (B, T, features)
            blocks = seen.unflatten(-1, (-1, member.block))  # (B, T, groups, block)
            assert torch.count_nonzero(blocks[:, :, dead]) == 0
            assert torch.count_nonzero(blocks[:, :, ~dead]) > 0


def test_training_prunes_on_the_schedule_monotonically_and_weakest_first(monkeypatch):
    settings = PruneSettings(ratio=0.5, steps=12, prune_freq=3, lr=1e-2)
    events = []
    real_prune_to = loraprune.prune_to

    def recording_prune_to(group_set, ratio):
        before = group_set.mask.clone()
        real_prune_to(group_set, ratio)
        newly = before.bool() & ~group_set.mask.bool()
        alive = group_set.mask.bool()
        if newly.any() and alive.any():  # the pruned groups were the weakest of those alive
            assert group_set.importance[newly].max() <= group_set.importance[alive].min()
        events.append((before, group_set.mask.clone()))

    monkeypatch.setattr(loraprune, "prune_to", recording_prune_to)
    torch.manual_seed(0)
    sets, history = train_masks(tiny_llama(), batches(), settings)

    assert [row["step"] for row in history] == [3, 6, 9, 12]
    for row in history:
        expected = cubic_sparsity(row["step"], 12, 0.0, 0.5, 0.1, 0.1) if row["step"] < 12 else 0.5
        assert row["ratio"] == pytest.approx(expected)
        for group_set in sets:
            size = group_set.mask.numel()
            assert row["pruned"][f"{group_set.layer}.{group_set.kind}"] == min(int(size * row["ratio"]), size - 1)
    assert all(torch.all(after <= before) for before, after in events)  # pruned stays pruned
    assert {s.kind: s.pruned for s in sets} == {"attention": 1, "mlp": 12}
    assert all(s.importance.sum() > 0 for s in sets)


def test_cut_model_equals_the_masked_model_with_merged_lora():
    model = tiny_llama()
    masked = copy.deepcopy(model)
    torch.manual_seed(1)
    sets, _ = train_masks(masked, batches(), PruneSettings(ratio=0.5, steps=6, prune_freq=2, lr=1e-2))
    merge(masked)
    masked.eval()
    copy_adapted_weights(masked, model)
    replaced = cut_pruned(model, sets)

    ids = batches(1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        cached = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        uncached = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)  # the KV cache copes with per-layer head counts
    attention = model.model.layers[1].self_attn
    assert attention.k_proj.out_features == 8 and attention.q_proj.out_features == 16
    assert attention.q_proj.bias.shape == (16,) and attention.o_proj.in_features == 16
    assert len(replaced) == 3 * 7


def test_parameter_count_after_pruning_matches_the_groups_removed():
    model = tiny_llama()
    before = sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    replaced, history = lora_prune(model, batches(), PruneSettings(ratio=0.5, steps=4, prune_freq=2))
    pruned = history[-1]["pruned"]
    hidden, head_dim, per_group = 32, 8, 2
    # a GQA group: q, k, v rows with their biases, and o_proj columns; an MLP channel: 3 vectors
    attention_group = (per_group + 2) * head_dim * (hidden + 1) + per_group * head_dim * hidden
    removed = sum(n * (attention_group if key.endswith("attention") else 3 * hidden) for key, n in pruned.items())
    assert sum(p.numel() for p in model.parameters()) == before - removed
    assert all(type(module) is nn.Linear for module in replaced.values())
    assert not any(hasattr(m, "mmadapt") for m in model.modules())  # no adapter or hook left behind


def test_prune_command_writes_a_folder_that_presets_train_on(tmp_path, capsys):
    preset = write_tiny_preset(tmp_path)
    out = tmp_path / "pruned"
    args = ["prune", "--preset", preset, "--out", str(out), "--steps", "6", "--prune-freq", "2",
            "--ratio", "0.5", "--batch-size", "2", "--seq-len", "32", *small_text_sets(tmp_path)]
    assert main(args) == 0
    meta = json.loads((out / "prepared.json").read_text())
    assert meta["method"] == "loraprune" and meta["settings"]["history"][-1]["ratio"] == 0.5
    assert meta["parameters"]["after"] < meta["parameters"]["before"]
    assert f"perplexity on {meta['perplexity']['text']}" in capsys.readouterr().out

    loaded = load_llm(load_preset(str(out / "preset.yaml")).llm)
    assert sum(p.numel() for p in loaded.model.parameters()) == meta["parameters"]["after"]
    assert base_fingerprint(loaded.model) == meta["fingerprint"]
    assert loaded.model.model.layers[0].mlp.gate_proj.out_features == 64  # 128 channels, half cut

    # The preset trains PLoRA on the pruned base; text-only logits stay the base's.
    overrides = [f"model={out}/preset.yaml", "train.align_steps=0", "train.trainable=[adapters,projector]"]
    cfg = load_config(REPO / "configs" / "xcomposer.yaml", overrides)
    model = build_model(cfg)
    assert model.base_fingerprint == meta["fingerprint"]
    for param in adapter_parameters(model.llm).values():
        nn.init.normal_(param)
    ids = torch.randint(3, 259, (1, 9))
    with torch.no_grad():
        assert torch.equal(model.llm.eval()(input_ids=ids).logits, loaded.model.eval()(input_ids=ids).logits)

    # A prepared model can be prepared again: the pruned shapes carry over into the new folder.
    factored = tmp_path / "pruned-then-factored"
    args = ["decompose", "--preset", str(out / "preset.yaml"), "--out", str(factored), "--rank", "4", "--data-free",
            "--targets", "up_proj", *small_text_sets(tmp_path)[:2]]
    assert main(args) == 0
    twice = load_llm(load_preset(str(factored / "preset.yaml")).llm).model
    assert twice.model.layers[0].mlp.gate_proj.out_features == 64 and twice.model.layers[0].mlp.up_proj.rank == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "1"], "--ratio is the fraction of groups removed, in (0, 1); got 1.0"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--calibration", "nowhere.jsonl"], "--calibration: text file nowhere.jsonl does not exist"),
        (["--preset", "models/no-such.yaml"], "model preset 'models/no-such.yaml' not found"),
    ],
)
def test_prune_bad_input_is_one_clear_line(tmp_path, capsys, extra, message):
    preset = ["--preset", write_tiny_preset(tmp_path)] if "--preset" not in extra else []
    assert main(["prune", *preset, "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_prune_refuses_a_model_it_cannot_group(tmp_path, capsys):
    preset = tmp_path / "neox.yaml"
    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4}
    llm = {"source": "random", "arch": "gpt_neox", "tokenizer": "bytes", "config": config}
    preset.write_text(json.dumps({"llm": llm}))
    assert main(["prune", "--preset", str(preset), "--out", str(tmp_path / "out")]) == 2
    assert "LoRAPrune needs Llama-style decoder layers" in capsys.readouterr().err
