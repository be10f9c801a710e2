"""Texts given in files: what ``xtd eval`` scores, ``xtd align`` aligns and ``xtd train
--eval-text`` tracks; task files, sampling prompts, and the held-out end of the embedded corpus.

``--text FILE`` means the same in every command: a ``.txt`` file is one text, a ``.jsonl``
file holds one text per line in its ``text`` field (read by :func:`xtd.data.iter_jsonl`,
which names the line and byte of any problem).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

from xtd.assets import iter_embedded_corpus
from xtd.data import iter_jsonl
from xtd.errors import ConfigError, DataError
from xtd.maths import ANSWER_FORMATS

__all__ = ["held_out_texts", "read_prompts", "read_tasks", "read_texts"]


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    """Texts to score: a ``.jsonl`` file (field ``text`` per line) or a plain text file.

    Raises:
        DataError: missing file, invalid UTF-8, a JSON line without a string ``text``,
            or no non-empty text at all.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {str(p)!r} does not exist; pass a .txt or .jsonl file with --text")
    if p.suffix == ".jsonl":
        texts = []
        for number, record in iter_jsonl(p, fix="convert it to UTF-8"):
            if not isinstance(record.get("text"), str):
                raise DataError(f"{str(p)!r} line {number} has no string field 'text'")
            texts.append(record["text"])
    else:
        try:
            texts = [p.read_text(encoding="utf-8")]
        except UnicodeDecodeError as exc:
            raise DataError(f"text file {str(p)!r} is not valid UTF-8 (byte {exc.start}); convert it to UTF-8") from None
    if not any(texts):
        raise DataError(f"text file {str(p)!r} is empty: there is no text to score")
    return texts


def read_tasks(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Prompt/answer pairs from a JSON-lines file (``{"prompt": ..., "answer": ...}``, optionally
    ``"answer_format"``: one of :data:`xtd.maths.ANSWER_FORMATS`).

    Raises:
        DataError: missing or empty file, bad JSON or UTF-8, a line without string fields.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"task file {str(p)!r} does not exist; pass a JSON-lines file with --task")
    tasks = []
    for number, record in iter_jsonl(p, fix="convert it to UTF-8"):
        if not all(isinstance(record.get(k), str) for k in ("prompt", "answer")):
            raise DataError(f"{str(p)!r} line {number} needs string fields 'prompt' and 'answer'")
        task = {"prompt": record["prompt"], "answer": record["answer"]}
        if "answer_format" in record:  # scored on the final answer (xtd.maths)
            if record["answer_format"] not in ANSWER_FORMATS:
                raise DataError(
                    f"{str(p)!r} line {number}: unknown answer_format {record['answer_format']!r}; "
                    f"use one of {', '.join(map(repr, ANSWER_FORMATS))} or leave it out"
                )
            task["answer_format"] = record["answer_format"]
        tasks.append(task)
    if not tasks:
        raise DataError(f"task file {str(p)!r} is empty: no prompt/answer pairs")
    return tasks


def held_out_texts(num_documents: int) -> list[str]:
    """The last ``num_documents`` documents of the embedded corpus, in corpus order.

    Precompute's default slice starts at the first document, so these stay unseen.
    """
    if num_documents < 1:
        raise ConfigError(f"--held-out ({num_documents}) must be at least 1")
    tail = collections.deque(iter_embedded_corpus(), maxlen=num_documents)
    return [record["text"] for record in tail]


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a ``.jsonl`` file (field ``text``) or a text file (one per non-empty line).

    Raises:
        DataError: a missing, empty, non-UTF-8 or malformed file.
    """
    p = Path(path)
    if p.suffix == ".jsonl":
        return read_texts(p)
    if not p.is_file():
        raise DataError(f"prompt file {str(p)!r} does not exist; pass a .txt (one prompt per line) or .jsonl file")
    try:
        lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise DataError(f"prompt file {str(p)!r} is not valid UTF-8 (byte {exc.start}); convert it to UTF-8") from None
    if not lines:
        raise DataError(f"prompt file {str(p)!r} has no non-empty line")
    return lines
