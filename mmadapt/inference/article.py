"""Write a composed article: Markdown with image copies, a self-contained HTML page, the decision record.

::

    OUT/article.md        paragraphs and ![caption](images/NAME) lines
    OUT/images/NAME       copies of the chosen images, for article.md
    OUT/article.html      the same article, images embedded as data: URLs
    OUT/decisions.json    inputs, paragraphs, placement, and per slot its caption and every score

Each file is written to a temporary name in ``OUT`` and renamed into place, so a file
is either the previous run's or this run's, never half written.
"""

from __future__ import annotations

import base64
import html
import json
import mimetypes
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from mmadapt.inference.compose import Slot

STYLE = (
    "body{max-width:42em;margin:2em auto;padding:0 1em;font:1.1em/1.6 Georgia,serif;color:#222}"
    "figure{margin:1.5em 0;text-align:center}img{max-width:100%;height:auto}"
    "figcaption{font-style:italic;color:#555;margin-top:.4em}"
)


def write_article(out_dir: Path, paragraphs: list[str], slots: list[Slot], record: dict) -> None:
    """Write the article's files to ``out_dir`` (created if missing).

    Args:
        out_dir: the output folder.
        paragraphs: the article text, one paragraph per entry.
        slots: the images, each after paragraph ``slot.after``.
        record: everything else ``decisions.json`` holds (inputs, placement); slots are added.
    """
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for slot in slots:
        write_atomic(out_dir / "images" / slot.image.name, slot.image.path.read_bytes())
    decisions = {**record, "slots": [_slot_record(k, slot) for k, slot in enumerate(slots)]}
    write_atomic(out_dir / "decisions.json", (json.dumps(decisions, indent=2, ensure_ascii=False) + "\n").encode())
    write_atomic(out_dir / "article.md", render_markdown(paragraphs, slots).encode())
    write_atomic(out_dir / "article.html", render_html(record["instruction"], paragraphs, slots).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # only left when writing or renaming failed


def render_markdown(paragraphs: list[str], slots: list[Slot]) -> str:
    """Paragraphs separated by blank lines, each slot's image line after its paragraph."""
    blocks = []
    for k, paragraph in enumerate(paragraphs):
        blocks.append(paragraph)
        for slot in _after(slots, k):
            alt = slot.caption.replace("[", "").replace("]", "")  # brackets would end the alt text
            blocks.append(f"![{alt}](images/{quote(slot.image.name)})")
    return "\n\n".join(blocks) + "\n"


def render_html(title: str, paragraphs: list[str], slots: list[Slot]) -> str:
    """A standalone page: paragraphs and figures, every image embedded as a ``data:`` URL."""
    body = []
    for k, paragraph in enumerate(paragraphs):
        body.append(f"<p>{html.escape(paragraph)}</p>")
        for slot in _after(slots, k):
            caption = html.escape(slot.caption)
            body.append(
                f'<figure><img src="{_data_url(slot.image.path)}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        "<body>\n<article>\n" + "\n".join(body) + "\n</article>\n</body>\n</html>\n"
    )


def _after(slots: list[Slot], paragraph: int) -> list[Slot]:
    return [slot for slot in slots if slot.after == paragraph]


def _data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _slot_record(index: int, slot: Slot) -> dict:
    return {
        "slot": index,
        "after_paragraph": slot.after + 1,  # 1-based, as the paragraphs were numbered for the model
        "caption": slot.caption,
        "image": slot.image.name,
        "source": str(slot.image.path),
        "score": slot.scores[slot.image.name],
        "scores": slot.scores,
    }
