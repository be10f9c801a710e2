"""Training checkpoints for ``xtd train``: atomic save, the newest one, pruning, exact resume.

A checkpoint is the folder ``<out>/checkpoints/step-NNNNNNNN`` (zero-padded, so names sort
by step) holding

* ``trainable.pt``: the trainable weights only — everything else is rebuilt identically
  by the seeded student load;
* ``optimizer.pt``: the AdamW state;
* ``state.pt``: the step (which is also the data position: the data order is a pure
  function of it, see :mod:`xtd.batching`), the Python/NumPy/torch(/CUDA) RNG states and
  the run's counters;
* ``config.json``: the :class:`~xtd.config.TrainConfig`, checked on ``--resume``.

It is written into a temporary folder, synced and renamed, so a killed writer never
leaves a half checkpoint that :func:`latest_checkpoint` would pick (STYLE.md §6).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xtd.config import TrainConfig, flag
from xtd.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_DIR",
    "RESUMABLE_CHANGES",
    "trainable_parameters",
    "save_checkpoint",
    "latest_checkpoint",
    "prune_checkpoints",
    "check_resume_config",
    "restore_checkpoint",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_DIR = "checkpoints"
# Settings that may change between a run and its --resume without changing the maths.
RESUMABLE_CHANGES = frozenset(
    {"resume", "overwrite", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "device", "max_steps",
     "eval_text", "eval_every", "eval_max_length"}
)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (and that a checkpoint saves), by name, in model order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch CPU (and CUDA, when present) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states :func:`rng_state` returned (CUDA only where saved and present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path, step: int, root: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig, counters: dict[str, Any]
) -> Path:
    """Write ``out/checkpoints/step-NNNNNNNN`` atomically (temp folder → rename).

    Holds the trainable weights (everything else is rebuilt identically by the
    seeded student load), the AdamW state, the RNG states, the data position (the
    step: the data order is a pure function of it), counters and the config.
    """
    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({k: v.detach().cpu() for k, v in trainable_parameters(root).items()}, tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(
        {"step": step, "scheduler": {"step": step}, "data_position": step, "rng": rng_state(), "counters": counters},
        tmp / "state.pt",
    )
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    for path in tmp.iterdir():  # make the contents durable before the rename publishes them
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder in ``out`` (temp folders never count)."""
    root = out / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    return done[-1] if done else None


def prune_checkpoints(out: Path, keep: int) -> None:
    """Keep the ``keep`` (at least one) newest checkpoints; remove temp folders of killed writers."""
    root = out / CHECKPOINT_DIR
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[: max(0, len(done) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):  # left by a killed writer
        shutil.rmtree(tmp, ignore_errors=True)


def check_resume_config(saved: dict[str, Any], config: TrainConfig, where: Path) -> None:
    """Refuse to resume with settings that change the maths (all but :data:`RESUMABLE_CHANGES`).

    Raises:
        ConfigError: naming every changed flag with its old and new value.
    """
    now = config.to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        details = ", ".join(f"{flag(k)} {saved.get(k)!r} → {now[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot --resume from {str(where)!r}: {details} changed; use the original settings, "
            f"or {flag('overwrite')} to start afresh"
        )


def restore_checkpoint(
    checkpoint: Path,
    root: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    device: torch.device,
) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint into ``root`` and ``optimizer`` and restore the RNG states.

    The config is checked first (:func:`check_resume_config`), so a refused resume
    changes nothing.

    Returns:
        (the step to continue from, the saved counters).

    Raises:
        ConfigError: the run's settings differ from the checkpoint's.
    """
    saved = json.loads((checkpoint / "config.json").read_text())
    check_resume_config(saved, config, checkpoint)
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    trainable = torch.load(checkpoint / "trainable.pt", map_location=device)
    with torch.no_grad():
        for name, p in trainable_parameters(root).items():
            p.copy_(trainable[name])
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device))
    set_rng_state(state["rng"])
    return int(state["step"]), dict(state["counters"])
