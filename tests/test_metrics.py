from collections import Counter

import pytest

from mmadapt.metrics import METRICS, exact_match, metric, parse_shapes, shapes_match


def test_parse_lists_colour_shape_pairs():
    assert parse_shapes("A red circle, a blue square and a green triangle.") == Counter(
        {("red", "circle"): 1, ("blue", "square"): 1, ("green", "triangle"): 1}
    )


def test_parse_is_case_and_punctuation_insensitive():
    assert parse_shapes("A RED Circle!!  a Yellow-square") == Counter(
        {("red", "circle"): 1, ("yellow", "square"): 1}
    )


def test_parse_counts_repeats_and_number_words():
    assert parse_shapes("A red circle and a red circle.") == Counter({("red", "circle"): 2})
    assert parse_shapes("Two red circles and 3 blue squares.") == Counter(
        {("red", "circle"): 2, ("blue", "square"): 3}
    )


def test_parse_marks_shape_without_colour():
    assert parse_shapes("A circle.") == Counter({("?", "circle"): 1})
    assert parse_shapes("A purple square.") == Counter({("?", "square"): 1})


def test_parse_ignores_text_without_shapes():
    assert parse_shapes("Blue.") == Counter()
    assert parse_shapes("") == Counter()


def test_match_ignores_order_and_wording():
    assert shapes_match("There is a blue square next to a red circle", "A red circle and a blue square.")
    assert shapes_match("Two red circles.", "A red circle and a red circle.")


def test_match_rejects_extra_missing_or_wrong_shapes():
    reference = "A red circle and a blue square."
    assert not shapes_match("A red circle, a blue square and a green triangle.", reference)
    assert not shapes_match("A red circle.", reference)
    assert not shapes_match("A red circle and a green square.", reference)
    assert not shapes_match("A red circle and a square.", reference)


def test_exact_strips_whitespace_only():
    assert exact_match(" Blue.\n", "Blue.")
    assert not exact_match("blue.", "Blue.")


def test_metric_registry():
    assert metric("shapes") is shapes_match
    assert metric("exact") is exact_match
    assert set(METRICS) == {"shapes", "exact"}
    with pytest.raises(ValueError, match=r"'bleu'.*exact, shapes"):
        metric("bleu")
