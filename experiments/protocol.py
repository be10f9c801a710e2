"""The comparison protocol shared by the distillation-fidelity experiments.

Every method is trained and scored the same way (settings A and B, ``table1.py`` and
``smollm2.py``):

1. **Learning rate.** Seed 0 is trained at every learning rate of the grid; the rate
   with the lowest *validation* bits per byte after the last step is chosen. The
   validation set is held-out text of the distillation domain, disjoint from every
   test set.
2. **Seeds.** At the chosen rate, seeds 1 … n−1 are trained too; the seed-0 run of the
   grid is reused, so each reported cell has n seeds (mean ± sample standard deviation).
3. **Learning curves.** Each run scores every evaluation set every ``eval_every`` steps
   and after the last (``xtd train --eval-text``), in windows of at most the training
   length (``--eval-max-length`` = ``--max-student-length``).
4. **Gap closed.** Per set, (FVT − student) / (FVT − teacher): 1 means the student
   reaches its teacher, 0 its untrained FVT initialisation, below 0 worse than that.

Every run's numbers are kept (``runs`` and ``grid``), not only the summary.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xtd.config import TrainConfig
from xtd.eval_sets import EvalSet, metric_key, score_eval_sets
from xtd.train import train

__all__ = [
    "Method",
    "Target",
    "Protocol",
    "write_eval_sets",
    "score_folder",
    "run_method",
    "summarise_runs",
    "machine_state",
    "save_setting",
]


@dataclasses.dataclass(frozen=True)
class Method:
    """A row of the table: its name and the ``TrainConfig`` settings that make it."""

    name: str
    settings: dict[str, Any]

    def for_target(self, target: Target) -> dict[str, Any]:
        """The settings on ``target``: ALM-family methods take the target's extra losses."""
        settings = dict(self.settings)
        if target.alm_extra_losses and "alm" in settings["losses"].split("+"):
            settings["losses"] += target.alm_extra_losses
        return settings


@dataclasses.dataclass(frozen=True)
class Target:
    """A student tokenizer and the training budget of every run on it."""

    name: str
    tokenizer: str
    max_length: int  # student tokens per text, and the scoring window
    batch_size: int
    steps: int
    eval_every: int
    settings: dict[str, Any]  # TrainConfig settings of every method on this target
    alm_extra_losses: str = ""  # e.g. "+latents": the paper's byte recipe for ALM methods


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The learning-rate grid, seeds and the set that picks the rate."""

    lrs: tuple[float, ...]
    seeds: int
    validation: str


def write_eval_sets(sets: dict[str, list[str]], folder: Path) -> tuple[str, ...]:
    """Write each set as ``<name>.jsonl``; returns the ``--eval-text NAME=FILE`` values."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, texts in sets.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
        specs.append(f"{name}={path}")
    return tuple(specs)


def score_folder(folder: str | Path, sets: dict[str, list[str]], max_length: int) -> dict[str, float]:
    """Bits per byte of a saved model on every set (the code path of ``--eval-text``)."""
    from xtd.student import load_causal_lm, model_tokenizer

    model = load_causal_lm(str(folder))
    tokenizer = model_tokenizer(str(folder))
    scores = score_eval_sets(model, tokenizer, [EvalSet(n, tuple(t)) for n, t in sets.items()], max_length=max_length)
    del model
    gc.collect()
    return {name: scores[metric_key(name)] for name in sets}


def _curve(history: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    return [
        {"step": r["step"], "epoch": round(r["epoch"], 3), **{n: r[metric_key(n)] for n in names}}
        for r in history
        if metric_key(names[0]) in r
    ]


def _one_run(
    store: str, student: str, target: Target, method: Method, lr: float, seed: int, specs: tuple[str, ...],
    names: list[str], out: Path, keep_model: bool,
) -> dict[str, Any]:
    settings = method.for_target(target)
    config = TrainConfig(
        store=(store,), student=student, tokenizer=target.tokenizer, out=str(out), lr=lr, seed=seed,
        max_steps=target.steps, warmup_steps=target.steps // 10, batch_size=target.batch_size,
        max_student_length=target.max_length, checkpoint_every=0, keep_checkpoints=0, overwrite=True,
        log_every=target.eval_every, eval_text=specs, eval_every=target.eval_every,
        eval_max_length=target.max_length, **{**target.settings, **settings},
    )
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    curve = _curve(result.history, names)
    record = {
        "seed": seed, "lr": lr, "losses": config.losses, "steps": result.steps,
        "epochs": round(result.history[-1]["epoch"], 2) if result.history else 0.0,
        "train_tokens": result.tokens, "seconds": round(seconds, 1),
        "final": {n: curve[-1][n] for n in names}, "curve": curve,
    }
    if not keep_model:  # the scores are in metrics.jsonl and the record; drop the weights
        for path in out.iterdir():
            if path.name not in ("metrics.jsonl", "train_config.json"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return record


def run_method(
    store: str, student: str, target: Target, method: Method, sets: dict[str, list[str]], work: Path,
    protocol: Protocol, *, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The lr grid at seed 0, then the other seeds at the chosen lr (module docstring).

    Returns:
        ``{"losses", "settings", "lr_grid": {lr: validation}, "lr", "runs": [...], "grid": [...]}``;
        ``runs`` are the chosen lr's seeds, ``grid`` the seed-0 runs at the other rates.
        The seed-0 model at the chosen rate stays in ``work`` (``model_dir``) for diagnostics.
    """
    names = list(sets)
    specs = write_eval_sets(sets, work / "eval-sets")
    slug = method.name.lower().replace(" ", "").replace(",", "-").replace("+", "p").replace("=", "")
    grid: dict[float, dict[str, Any]] = {}
    for lr in protocol.lrs:
        out = work / f"{target.name}-{slug}-lr{lr:g}-s0"
        grid[lr] = _one_run(store, student, target, method, lr, 0, specs, names, out, keep_model=True)
        log(f"  {target.name:8s} {method.name:18s} lr {lr:g} seed 0: validation "
            f"{grid[lr]['final'][protocol.validation]:.4f} ({grid[lr]['seconds']} s)")
    chosen = min(protocol.lrs, key=lambda lr: grid[lr]["final"][protocol.validation])
    for lr in protocol.lrs:  # keep the chosen rate's seed-0 model only
        if lr != chosen:
            shutil.rmtree(work / f"{target.name}-{slug}-lr{lr:g}-s0", ignore_errors=True)
    runs = [grid[chosen]]
    for seed in range(1, protocol.seeds):
        out = work / f"{target.name}-{slug}-lr{chosen:g}-s{seed}"
        runs.append(_one_run(store, student, target, method, chosen, seed, specs, names, out, keep_model=False))
        log(f"  {target.name:8s} {method.name:18s} lr {chosen:g} seed {seed}: "
            + ", ".join(f"{n} {runs[-1]['final'][n]:.4f}" for n in names) + f" ({runs[-1]['seconds']} s)")
    return {
        "losses": runs[0]["losses"],
        "settings": {k: v for k, v in method.for_target(target).items() if k != "losses"},
        "lr_grid": {f"{lr:g}": grid[lr]["final"][protocol.validation] for lr in protocol.lrs},
        "lr": chosen,
        "runs": runs,
        "grid": [grid[lr] for lr in protocol.lrs if lr != chosen],
        "model_dir": str(work / f"{target.name}-{slug}-lr{chosen:g}-s0"),
    }


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else math.nan,
        "n": len(values),
    }


def summarise_runs(result: dict[str, Any], fvt: dict[str, float], teacher: dict[str, float]) -> dict[str, Any]:
    """Mean ± std per set over the chosen lr's seeds, and the share of the FVT → teacher gap closed."""
    out: dict[str, Any] = {"bits_per_byte": {}, "gap_closed": {}}
    for name in fvt:
        values = [r["final"][name] for r in result["runs"]]
        out["bits_per_byte"][name] = _mean_std(values)
        gap = fvt[name] - teacher[name]
        out["gap_closed"][name] = _mean_std([(fvt[name] - v) / gap for v in values]) if gap else None
    return out


def machine_state() -> dict[str, Any]:
    """CPU count, torch threads and the load average: was the machine shared during the run?"""
    import torch

    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_1_5_15": list(load)}


def save_setting(path: Path, key: str, setting: dict[str, Any]) -> dict[str, Any]:
    """Put one setting into ``experiment.json`` next to the others already there."""
    results: dict[str, Any] = {}
    if path.exists():
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError:
            results = {}
        if not isinstance(results, dict) or "runs" in results:  # the earlier single-setting format
            results = {}
    results[key] = setting
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(results), indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return results


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
