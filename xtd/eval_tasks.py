"""Benchmarks through lm-evaluation-harness, and local tasks that run offline.

``xtd eval --tasks`` runs lm-eval tasks on xtd models (:class:`xtd.lm_eval_model.XtdLM`).
Any task lm-eval knows works where its data can be loaded; for machines without a hub,
xtd ships two multiple-choice tasks built from held-out text of the embedded corpus,
defined as ordinary lm-eval YAML files in ``xtd/lm_eval_tasks/`` (so ``lm_eval
--include_path`` runs them on any Hugging Face model too):

* ``xtd_next_verse`` — the last 16 chapters of the King James Bible (the held-out end of
  the embedded corpus, ``xtd eval --held-out``): after a verse, which of four verses
  comes next?
* ``xtd_next_line`` — *The Tempest* (a play held out of the Table 1 teacher's data): after
  up to two lines of a speech, which of four lines comes next?

A document is ``{"context", "choices", "label"}``; the continuation is scored right after
the context (the context ends with its line break). lm-eval reports ``acc`` (the choice
of highest log-likelihood) and ``acc_bytes`` (of highest log-likelihood per UTF-8 byte of
the choice: byte-normalised, comparable across tokenizers). Distractors are other lines
of the same text, drawn with a fixed seed, so every build gives the same documents.

A task argument may also be a path to a YAML task file (or a folder of them): its folder
is added to lm-eval's task search path.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xtd.errors import ConfigError

__all__ = [
    "LOCAL_TASKS",
    "TASK_METRICS",
    "task_folder",
    "choice_docs",
    "next_verse_docs",
    "next_line_docs",
    "local_task_docs",
    "check_tasks",
    "run_tasks",
]

logger = logging.getLogger(__name__)

LOCAL_TASKS = ("xtd_next_verse", "xtd_next_line")
TASK_METRICS = ("acc", "acc_bytes", "acc_norm")
NUM_CHOICES = 4
_VERSE_CHAPTERS = 16
_LINE_PLAY = "the-tempest"
_MAX_DOCS = 200


def task_folder() -> Path:
    """The folder of xtd's lm-eval task definitions (``--include_path`` for ``lm_eval``)."""
    return Path(__file__).resolve().parent / "lm_eval_tasks"


def choice_docs(
    passages: Sequence[Sequence[str]],
    *,
    context_lines: int,
    num_docs: int = _MAX_DOCS,
    num_choices: int = NUM_CHOICES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Next-line multiple-choice documents from passages (each a list of lines).

    Each position ``i ≥ 1`` of a passage is a candidate: its context is the up to
    ``context_lines`` lines before it (each followed by ``"\\n"``), the gold choice is line
    ``i``, and the distractors are ``num_choices - 1`` other distinct lines of any passage.
    ``num_docs`` candidates are taken evenly spread; choices are shuffled.

    Returns:
        ``[{"context": str, "choices": [str], "label": int}]`` (deterministic in ``seed``).
    """
    pool = sorted({line for passage in passages for line in passage})
    candidates = [(p, i) for p, passage in enumerate(passages) for i in range(1, len(passage))]
    if len(pool) < num_choices or not candidates:
        raise ConfigError(f"too little text for a {num_choices}-choice task ({len(pool)} distinct lines)")
    rng = np.random.default_rng(seed)
    picks = np.unique(np.linspace(0, len(candidates) - 1, min(num_docs, len(candidates))).round().astype(int))
    docs = []
    for k in picks:
        p, i = candidates[int(k)]
        lines = passages[p]
        gold = lines[i]
        others: list[str] = []
        while len(others) < num_choices - 1:
            line = pool[int(rng.integers(len(pool)))]
            if line != gold and line not in others:
                others.append(line)
        choices = [gold, *others]
        order = rng.permutation(num_choices)
        context = "".join(line + "\n" for line in lines[max(0, i - context_lines) : i])
        docs.append(
            {"context": context, "choices": [choices[j] for j in order], "label": int(np.argmin(order))}
        )
    return docs


def next_verse_docs(num_docs: int = _MAX_DOCS) -> list[dict[str, Any]]:
    """``xtd_next_verse``: verses of the last chapters of the embedded KJV."""
    from xtd.texts import held_out_texts

    chapters = [[v for v in text.splitlines() if v.strip()] for text in held_out_texts(_VERSE_CHAPTERS)]
    return choice_docs(chapters, context_lines=1, num_docs=num_docs)


def next_line_docs(num_docs: int = _MAX_DOCS) -> list[dict[str, Any]]:
    """``xtd_next_line``: lines of speeches of *The Tempest* (speaker names, stage directions dropped)."""
    from xtd.assets import shakespeare_paths

    path = next(p for p in shakespeare_paths() if p.stem == _LINE_PLAY)
    speeches: list[list[str]] = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = [line.strip() for line in block.splitlines()]
        if not lines or not lines[0].startswith("**"):
            continue  # headings and stage directions
        verse = [line for line in lines[1:] if len(line) >= 12 and not line.startswith(("_", "#", "*"))]
        if len(verse) >= 2:
            speeches.append(verse)
    return choice_docs(speeches, context_lines=2, num_docs=num_docs, seed=1)


def local_task_docs(name: str) -> list[dict[str, Any]]:
    """The documents of a local task (what its YAML's ``custom_dataset`` returns)."""
    builders = {"xtd_next_verse": next_verse_docs, "xtd_next_line": next_line_docs}
    if name not in builders:
        raise ConfigError(f"unknown local task {name!r}; xtd ships {', '.join(LOCAL_TASKS)}")
    return builders[name]()


def check_tasks(tasks: Sequence[str]) -> None:
    """Fail early (before models load) on a missing lm-eval or an unknown task.

    Raises:
        ConfigError: naming the extra to install, or the unknown tasks.
    """
    _task_manager(tuple(tasks))


@functools.lru_cache(maxsize=4)
def _task_manager(tasks: tuple[str, ...]) -> tuple[Any, list[str]]:
    """An lm-eval TaskManager that finds xtd's tasks, YAML paths given, and (when asked) lm-eval's own;
    and the task names, each checked to be known."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("--tasks needs lm-evaluation-harness: pip install 'xtd[eval]'") from None

    include = [str(task_folder())]
    names = []
    for task in tasks:
        path = Path(task)
        if task.endswith((".yaml", ".yml")) or path.is_dir():
            if not path.exists():
                raise ConfigError(f"--tasks {task!r}: no such task file or folder")
            include.append(str(path if path.is_dir() else path.parent))
            if path.is_file():
                import yaml

                names.append(str((yaml.load(path.read_text(), Loader=_IgnoreTags) or {}).get("task") or path.stem))
            else:
                names += [p.stem for p in sorted(path.glob("*.yaml"))]
        else:
            names.append(task)
    builtin = any(n not in LOCAL_TASKS for n in names)
    manager = TaskManager(include_path=include, include_defaults=builtin, verbosity="ERROR")
    unknown = [n for n in names if n not in set(manager.all_tasks)]
    if unknown:
        raise ConfigError(
            f"--tasks: unknown task(s) {', '.join(map(repr, unknown))}; local tasks are {', '.join(LOCAL_TASKS)}, "
            "or give any lm-eval task name or a task YAML file"
        )
    return manager, names


class _IgnoreTags:  # a yaml Loader that reads a task file without running its !function tags
    def __new__(cls, stream: Any) -> Any:
        import yaml

        loader = yaml.SafeLoader(stream)
        loader.add_constructor("!function", lambda loader, node: None)
        return loader


def run_tasks(lm: Any, tasks: Sequence[str], *, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on ``lm`` (an lm-eval ``LM``); one metrics dict per task.

    Args:
        lm: e.g. :class:`xtd.lm_eval_model.XtdLM`.
        tasks: task names (local ``xtd_*`` tasks, any task lm-eval knows) or YAML paths.
        limit: at most this many documents per task (the first ones).

    Returns:
        ``{task: {"acc": …, "acc_bytes": …, "num_examples": n}}`` with the metrics lm-eval
        reported among :data:`TASK_METRICS` (other metrics of other tasks too, as reported).

    Raises:
        ConfigError: an unknown task, or one whose data cannot be loaded here.
    """
    manager, names = _task_manager(tuple(tasks))
    import lm_eval

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(names), task_manager=manager, limit=limit, bootstrap_iters=0,
            log_samples=False, verbosity="ERROR",
        )  # fmt: skip
    except (ConnectionError, OSError, ValueError) as exc:
        raise ConfigError(f"--tasks {','.join(names)}: lm-eval could not run it ({exc}); offline, use "
                          f"the local tasks {', '.join(LOCAL_TASKS)} or a task YAML with local data") from None  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if flt in ("none", "") and metric not in ("sample_len", "alias") and not metric.endswith("_stderr") \
                    and isinstance(value, int | float):
                if not (isinstance(value, float) and math.isnan(value)):
                    row[metric] = float(value)
        n = (out.get("n-samples") or {}).get(task, {})
        row["num_examples"] = int(n.get("effective", n.get("original", 0)) or 0)
        results[task] = row
    return results
