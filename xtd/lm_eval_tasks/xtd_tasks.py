"""The ``custom_dataset`` functions of xtd's lm-eval task YAML files (documents: xtd.eval_tasks)."""

from __future__ import annotations

from typing import Any


def _dataset(name: str) -> Any:
    import datasets

    from xtd.eval_tasks import local_task_docs

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(local_task_docs(name))})


def next_verse(**kwargs: Any) -> Any:
    """``xtd_next_verse`` as a ``datasets.DatasetDict`` with one ``test`` split."""
    del kwargs  # lm-eval passes the task metadata
    return _dataset("xtd_next_verse")


def next_line(**kwargs: Any) -> Any:
    """``xtd_next_line`` as a ``datasets.DatasetDict`` with one ``test`` split."""
    del kwargs
    return _dataset("xtd_next_line")
