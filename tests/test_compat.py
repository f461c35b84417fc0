"""mmadapt.compat picks the installed transformers' names, old (5.17) or new (5.24)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from mmadapt.compat import cache_argument, set_activation_checkpointing
from tests.conftest import tiny_causal_lm


class _Old(nn.Module):
    """The surface of a transformers 5.17 model: the old names only."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        return input_ids

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.calls.append(("enable", gradient_checkpointing_kwargs))

    def gradient_checkpointing_disable(self):
        self.calls.append(("disable",))


def test_the_old_names_are_used_where_the_new_ones_are_missing():
    model = _Old()
    set_activation_checkpointing(model, use_reentrant=False)
    set_activation_checkpointing(model, enable=False)
    assert model.calls == [("enable", {"use_reentrant": False}), ("disable",)]
    assert cache_argument(_Old) == "past_key_values"


@pytest.mark.filterwarnings("error::FutureWarning")  # the deprecated aliases warn
def test_the_installed_transformers_model_takes_its_own_names():
    model = tiny_causal_lm()
    set_activation_checkpointing(model, use_reentrant=False)
    assert model.model.gradient_checkpointing
    set_activation_checkpointing(model, enable=False)
    assert not model.model.gradient_checkpointing
    cache = DynamicCache()
    model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{cache_argument(type(model)): cache})
    assert cache.get_seq_length() == 3  # the keyword reached the model: an ignored one leaves it empty
