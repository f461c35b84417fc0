import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # CI: 2 cores


def tiny_causal_lm(arch: str = "llama", seed: int = 0):
    """A 2-layer random HF causal LM of the given architecture, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch in ("llama", "qwen2"):
        sizes["num_key_value_heads"] = 2
    config = AutoConfig.for_model(arch, **sizes)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=["llama", "qwen2"])
def causal_lm(request):
    return tiny_causal_lm(request.param)
