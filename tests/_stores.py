"""Build small real teacher stores for the training tests.

``make_tiny_store`` runs a real teacher (a tiny random Llama folder, or SmolLM2) over a
few texts with :func:`xtd.scoring.score_texts` and writes the documents with
:class:`xtd.storage.StoreWriter`: the same two calls ``xtd precompute`` wires together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from xtd.tokenization import BOUNDARY_CLASSES


def corpus_texts(n: int = 8, chars: int = 400) -> list[str]:
    """The first ``n`` documents of the embedded corpus, cut to ``chars`` characters."""
    from xtd.assets import iter_embedded_corpus

    texts = []
    for record in iter_embedded_corpus():
        texts.append(record["text"][:chars])
        if len(texts) == n:
            break
    return texts


def make_tiny_store(
    tmp_path: Path,
    teacher_dir: str | Path,
    texts: list[str],
    *,
    name: str = "store",
    top_k: int = 4,
    hidden: bool = False,
    complete: bool = True,
    max_length: int = 256,
) -> Path:
    """Score ``texts`` with the teacher in ``teacher_dir`` and write a store under ``tmp_path``.

    Args:
        tmp_path: parent folder.
        teacher_dir: a Hugging Face causal LM folder (or ``embedded:smollm2``).
        texts: the documents.
        name: folder name of the store.
        top_k: top-k columns (0: none).
        hidden: also store last hidden states.
        complete: False leaves the store unfinished (as a killed precompute would).
        max_length: teacher window length.

    Returns:
        The store folder.
    """
    from xtd.scoring import score_texts
    from xtd.storage import StoreWriter
    from xtd.teacher import load_teacher

    teacher = load_teacher(str(teacher_dir), dtype="fp32", device="cpu")
    url = tmp_path / name
    attrs: dict[str, Any] = {
        "teacher": teacher.describe(),
        "tokenizer_json": teacher.tokenizer.to_json(),
        "boundary_classes": list(BOUNDARY_CLASSES),
        "dataset": {"source": "tests", "num_texts": len(texts)},
        "settings": {"top_k": top_k, "max_length": max_length, "hidden": hidden},
    }
    writer = StoreWriter(url, attrs=attrs, top_k=top_k, hidden_size=teacher.hidden_size if hidden else None)
    docs = score_texts(teacher, texts, top_k=top_k, max_length=max_length, stride=max_length // 2, hidden=hidden)
    for doc in docs:
        writer.write(doc)
    writer.close(complete=complete)
    return url


def describe(url: Path) -> dict[str, Any]:
    """The store's root attributes (for assertions)."""
    return json.loads((url / "zarr.json").read_text())["attributes"]


def tree_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes: proves a store was left untouched."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()
