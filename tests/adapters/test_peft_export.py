import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from mmadapt.adapters import adapter_parameters, disable_adapters, inject
from mmadapt.adapters.peft_export import export_peft
from mmadapt.errors import InputError
from tests.conftest import tiny_causal_lm

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = {
    "lora": {"type": "lora", "r": 2, "alpha": 6, "use_rslora": True, "dropout": 0.1},
    "plora": {"type": "plora", "r": 2, "alpha": 4},
    "dora": {"type": "dora", "r": 2, "alpha": 4},
    "miss": {"type": "miss", "r": 5},  # 5 divides no layer width: padded input
    "miss_bat": {"type": "bone", "variant": "bat", "r": 4},
    "miss_mini": {"type": "miss", "variant": "mini", "r": 4, "mini_r": 8},
}


def _adapted(arch, entries):
    model = tiny_causal_lm(arch)
    inject(model, entries)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()  # the adapters were added after tiny_causal_lm's eval(): no dropout


# qwen2's q/k/v carry a bias, which DoRA must leave unscaled and MiSS-bat must keep.
@pytest.mark.parametrize("arch, case", [("llama", case) for case in SPECS] + [("qwen2", "dora"), ("qwen2", "miss_bat")])
def test_peft_loads_export_with_same_logits(tmp_path, arch, case):
    model = _adapted(arch, [{**SPECS[case], "modalities": ["text"], "targets": ALL_PROJ}])
    tokens = torch.randint(0, 97, (2, 10))
    ours = model(input_ids=tokens).logits
    folders = export_peft(model, tmp_path)
    assert list(folders.values()) == [tmp_path]
    peft_model = PeftModel.from_pretrained(tiny_causal_lm(arch), tmp_path).eval()
    theirs = peft_model(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    with disable_adapters(model):
        assert not torch.allclose(theirs, model(input_ids=tokens).logits, atol=1e-3)


def test_peft_file_layout_and_key_names(tmp_path):
    model = _adapted("llama", [{**SPECS["dora"], "modalities": ["text"], "targets": ["q_proj", "down_proj"]}])
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] and config["task_type"] == "CAUSAL_LM"
    layers = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.q_proj")]
    assert sorted(config["target_modules"]) == layers
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    assert {k[len(prefix):] for k in keys if k.startswith(prefix)} == {
        "lora_A.weight", "lora_B.weight", "lora_magnitude_vector",
    }
    assert len(keys) == 4 * 3


def test_several_keys_one_folder_each_and_skipped_warning(tmp_path):
    entries = [
        {"type": "lora", "modalities": ["text"], "targets": ["q_proj"], "r": 2},
        {"type": "dora", "modalities": ["text", "image"], "targets": ["v_proj"], "r": 2},
        {"type": "lora", "name": "vision", "modalities": ["image"], "targets": ["q_proj"], "r": 2},
    ]
    model = _adapted("llama", entries)
    tokens = torch.randint(0, 97, (2, 10))
    ours = model(input_ids=tokens).logits
    with pytest.warns(UserWarning, match=r"skipped 1 adapter\(s\): vision: lora fires on \['image'\]"):
        folders = export_peft(model, tmp_path)
    assert folders == {"lora": tmp_path / "lora", "dora": tmp_path / "dora"}
    peft_model = PeftModel.from_pretrained(tiny_causal_lm(), folders["lora"], adapter_name="lora")
    peft_model.load_adapter(folders["dora"], adapter_name="dora")
    peft_model.base_model.set_adapter(["lora", "dora"])
    torch.testing.assert_close(peft_model.eval()(input_ids=tokens).logits, ours, atol=1e-5, rtol=0)


def test_multimodal_model_exports_its_llm(tmp_path):
    class Holder(torch.nn.Module):  # the one thing export_peft reads from a MultimodalLM
        def __init__(self, llm):
            super().__init__()
            self.llm = llm

    llm = _adapted("llama", [{"type": "miss", "modalities": ["text"], "targets": ["up_proj"], "r": 4}])
    export_peft(Holder(llm), tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(keys) == [f"base_model.model.model.layers.{i}.mlp.up_proj.miss_block" for i in (0, 1)]


def test_nothing_exportable_is_an_error(tmp_path):
    with pytest.raises(InputError, match="nothing to export.*found: none"):
        export_peft(tiny_causal_lm(), tmp_path)
    model = _adapted("llama", [{"type": "plora", "modalities": ["image"], "targets": ["q_proj"], "r": 2}])
    with pytest.warns(UserWarning, match="plora"), pytest.raises(InputError, match=r"nothing to export.*found: plora"):
        export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())
