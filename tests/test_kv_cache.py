"""``MultimodalLM.generate`` with the KV cache equals generation without it (``use_cache=False``).

Greedy, fp32, on the tiny preset with non-zero adapters: PLoRA's B starts at zero, so it
is randomised here, and the prompts' image and speech positions run through adapter
deltas that the cache must keep while every generated token stays text.
"""

from __future__ import annotations

import pytest

import mmadapt
from tests.helpers import (  # noqa: F401 (one_thread: fixture)
    GENERATION_PROMPTS, GREEDY_TOKENS, assert_same_greedy, generation_prompts, greedy, one_thread,
    tiny_model_with_live_adapters,
)


@pytest.fixture(scope="module")
def model(one_thread) -> mmadapt.MultimodalLM:
    return tiny_model_with_live_adapters()


@pytest.fixture(scope="module")
def prompts(model) -> dict[str, dict]:
    return generation_prompts(model)


@pytest.mark.parametrize("kind", list(GENERATION_PROMPTS))
def test_cached_generation_equals_uncached(model, prompts, kind):
    [cached] = greedy(model, [prompts[kind]])
    [uncached] = greedy(model, [prompts[kind]], use_cache=False)
    assert len(uncached) == GREEDY_TOKENS and len(set(uncached)) > 1  # a real answer, not one repeated token
    assert_same_greedy(model, prompts[kind], uncached, cached, f"{kind} prompt, cache vs no cache")


def test_cached_generation_equals_uncached_on_a_left_padded_mixed_batch(model, prompts):
    items = list(prompts.values())  # prompts of different lengths: every row but the longest is padded
    cached, uncached = greedy(model, items), greedy(model, items, use_cache=False)
    for item, expected, actual in zip(items, uncached, cached):
        assert_same_greedy(model, item, expected, actual, f"{item['id']} row of a mixed batch, cache vs no cache")


def test_adapters_change_modality_answers_only(model, prompts):
    """Guards the tests above: image and speech answers go through the adapters, text ones do not."""
    for kind, item in prompts.items():
        [adapted] = greedy(model, [item])
        with mmadapt.disable_adapters(model.llm):
            [base] = greedy(model, [item])
        assert (adapted == base) == (kind == "text"), kind


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_rows_that_end_early_leave_the_batch_and_the_rest_decode_as_alone(model, prompts, use_cache):
    items = list(prompts.values())
    [first] = greedy(model, items[:1], use_cache)
    eos, original_eos = first[2], model.tokenizer.eos_token_id
    model.tokenizer.eos_token_id = eos  # the first row now ends by its third token
    try:
        batched = greedy(model, items, use_cache)
        alone = [greedy(model, [item], use_cache)[0] for item in items]
    finally:
        model.tokenizer.eos_token_id = original_eos
    ended = batched[0].index(eos)
    assert ended <= 2 and set(batched[0][ended:]) == {eos}
    assert any(eos not in row[: ended + 2] for row in batched[1:])  # others decode on without that row
    for item, expected, row in zip(items, alone, batched):
        assert_same_greedy(model, item, _until_eos(expected, eos), _until_eos(row, eos), f"{item['id']} row, batch vs alone")
