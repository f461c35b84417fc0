"""Task metrics that score a generated answer against its reference.

Each metric is a predicate ``(generated, reference) -> bool``; evaluation reports
the fraction of samples for which it holds. ``shapes`` scores descriptions of the
bundled shapes data set (``data/make_shapes.py``), ``exact`` any short answer.
"""

import re
from collections import Counter
from collections.abc import Callable

COLOURS = frozenset({"red", "green", "blue", "yellow"})
SHAPES = frozenset({"circle", "square", "triangle"})
UNKNOWN_COLOUR = "?"

_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_WORD = re.compile(r"[a-z]+|\d+")


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word


def _count(word: str | None) -> int:
    if word is None:
        return 1
    if word.isdigit():
        return int(word)
    return _COUNTS.get(word, 1)


def parse_shapes(text: str) -> Counter[tuple[str, str]]:
    """Extracts the (colour, shape) mentions of a description.

    Matching is case-insensitive and ignores punctuation. A shape word takes the
    colour word right before it; without one it counts as ``("?", shape)``, which
    no reference contains, so the description is scored wrong. A number word or
    digit before the colour multiplies the mention: "two red circles" is two
    ``("red", "circle")``. A plural without a number counts once, and a colour
    shared by a coordination ("red and blue circles") is not distributed: only
    "blue" is attached.

    Args:
        text: Free text such as "A red circle and two blue squares."

    Returns:
        A multiset of ``(colour, shape)`` pairs.
    """
    words = _WORD.findall(text.lower())
    found: Counter[tuple[str, str]] = Counter()
    for i, word in enumerate(words):
        shape = _singular(word)
        if shape not in SHAPES:
            continue
        before = words[i - 1] if i >= 1 else None
        colour = before if before in COLOURS else UNKNOWN_COLOUR
        count_at = i - 2 if colour != UNKNOWN_COLOUR else i - 1
        found[(colour, shape)] += _count(words[count_at] if count_at >= 0 else None)
    return found


def shapes_match(generated: str, reference: str) -> bool:
    """True iff both texts name the same coloured shapes, in any order.

    Args:
        generated: The model's description.
        reference: The ground-truth caption.

    Returns:
        Whether the (colour, shape) multisets are equal: every shape named with
        its colour and nothing else.
    """
    return parse_shapes(generated) == parse_shapes(reference)


def exact_match(generated: str, reference: str) -> bool:
    """True iff the texts are equal after stripping surrounding whitespace."""
    return generated.strip() == reference.strip()


METRICS: dict[str, Callable[[str, str], bool]] = {
    "shapes": shapes_match,
    "exact": exact_match,
}


def metric(name: str) -> Callable[[str, str], bool]:
    """Looks up a task metric by name.

    Args:
        name: A key of ``METRICS``.

    Returns:
        The predicate ``(generated, reference) -> bool``.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the choices.
    """
    try:
        return METRICS[name]
    except KeyError:
        choices = ", ".join(sorted(METRICS))
        raise ValueError(f"unknown metric {name!r}; choose from: {choices}") from None
