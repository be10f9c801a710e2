"""The run folder of ``xtd train`` and its checkpoints: marker, atomic save, exact resume.

A run folder is recognised by its marker (:data:`xtd.outputs.RUN_MARKER`, written before
anything else); :func:`inspect_run_folder` decides, before any model loads, whether a
command starts afresh, resumes, has nothing to do, or must be refused — a folder holding
files xtd did not write is refused whatever the flags, and ``--overwrite`` deletes only
what a run writes (``checkpoints/``, ``metrics.jsonl``; the model files are replaced at
the end).

A checkpoint is the folder ``<out>/checkpoints/step-NNNNNNNN`` (zero-padded, so names sort
by step) holding

* ``trainable.pt``: the trainable weights only — everything else is rebuilt identically
  by the seeded student load;
* ``optimizer.pt``: the AdamW state;
* ``state.pt``: the step (which is also the data position: the data order is a pure
  function of it, see :mod:`xtd.data_plan`), the Python/NumPy/torch(/CUDA) RNG states as
  tensors and numbers, and the run's counters;
* ``config.json``: the :class:`~xtd.config.TrainConfig`, checked on ``--resume``.

Every ``.pt`` file holds tensors, numbers, strings and containers only and is loaded with
``torch.load(weights_only=True)``, so a crafted checkpoint cannot run code. A checkpoint
is written into a temporary folder, synced and renamed, so a killed writer never leaves a
half checkpoint that :func:`latest_checkpoint` would pick.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from xtd.config import ConfigBase, TrainConfig, flag
from xtd.errors import CheckpointError, ConfigError, StoreExistsError
from xtd.outputs import (
    canonical_location,
    check_output_folder,
    folder_listing,
    read_run_marker,
    write_run_marker,
    writing,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "RunCounters",
    "saved_config",
    "METRICS_FILE",
    "RESUMABLE_CHANGES",
    "trainable_parameters",
    "save_checkpoint",
    "latest_checkpoint",
    "prune_checkpoints",
    "check_resume_config",
    "load_checkpoint",
    "apply_checkpoint",
    "LoadedCheckpoint",
    "rng_state",
    "set_rng_state",
    "inspect_run_folder",
    "prepare_run_folder",
    "finish_run_folder",
    "append_metrics",
    "truncate_metrics",
    "save_model_into",
]

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
# Settings that may change between a run and its --resume without changing the maths
# (the run folder itself may move: --out is where it is now).
RESUMABLE_CHANGES = frozenset(
    {"resume", "overwrite", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "device",
     "max_steps", "out", "eval_text", "eval_every", "eval_max_length"}
)
_STAGING_PREFIX = ".tmp-"  # temporary names inside a run folder, removed by the next run

RunPlan = Literal["fresh", "resume", "done"]


@dataclass
class RunCounters:
    """What a run has done so far (kept in checkpoints, so a resumed run continues them)."""

    tokens: int = 0
    """Student tokens trained on, all ranks."""
    documents: int = 0
    """Texts trained on, all ranks."""
    elapsed_s: float = 0.0
    """Seconds spent in optimizer steps."""


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (and that a checkpoint saves), by name, in model order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------
# RNG states as tensors and numbers (loadable with weights_only=True)
# --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch CPU (and CUDA, when present) RNG states, as tensors and numbers."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states :func:`rng_state` returned (CUDA only where saved and present)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _save(obj: Any, path: Path) -> None:
    # Through a Python file object, so a full disk raises OSError (torch's own writer
    # raises a RuntimeError that names no cause).
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(
    out: Path, step: int, root: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
    counters: RunCounters,
) -> Path:
    """Write ``out/checkpoints/step-NNNNNNNN`` atomically (temp folder → rename).

    Holds the trainable weights (everything else is rebuilt identically by the
    seeded student load), the AdamW state, the RNG states, the data position (the
    step: the data order is a pure function of it), counters and the config.

    Raises:
        OutputError: the run folder cannot be written (full disk, read-only).
    """
    folder = out / CHECKPOINT_DIR
    final = folder / f"step-{step:08d}"
    tmp = folder / f"{_STAGING_PREFIX}step-{step:08d}-{os.getpid()}"
    with writing("run folder", out, "free space; the last complete checkpoint is kept for --resume"):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _save({k: v.detach().cpu() for k, v in trainable_parameters(root).items()}, tmp / "trainable.pt")
            _save(optimizer.state_dict(), tmp / "optimizer.pt")
            state = {
                "step": step, "scheduler": {"step": step}, "data_position": step, "rng": rng_state(),
                "counters": asdict(counters),
            }  # fmt: skip
            _save(state, tmp / "state.pt")
            (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
    for tmp in root.glob(f"{_STAGING_PREFIX}step-*"):  # left by a killed writer
        shutil.rmtree(tmp, ignore_errors=True)


def _comparable(settings: dict[str, Any], cls: type[ConfigBase] = TrainConfig) -> dict[str, Any]:
    """Settings by flag key (nested sections flattened; the flat form of older run folders
    reads the same), in canonical form: a relative and an absolute path to one store are equal.
    ``cls``: the run's config class (``xtd train``'s, or another run's such as ``xtd hypernet train``)."""
    out = cls.flat_values(settings)
    stores = out.get("store")
    if isinstance(stores, list | tuple):
        out["store"] = [canonical_location(str(s)) for s in stores]
    return out


def check_resume_config(saved: dict[str, Any], config: TrainConfig, where: Path) -> None:
    """Refuse to resume with settings that change the maths (all but :data:`RESUMABLE_CHANGES`).

    Stores are compared canonically (:func:`xtd.outputs.canonical_location`).

    Raises:
        ConfigError: naming every changed flag with its old and new value.
    """
    changed = _changed(saved, config)
    if changed:
        old, now = type(config).flat_values(saved), config.flat_dict()
        details = ", ".join(f"{flag(k)} {old.get(k)!r} → {now[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot --resume from {str(where)!r}: {details} changed; use the original settings, "
            f"or {flag('overwrite')} to start afresh"
        )


def _changed(saved: dict[str, Any], config: TrainConfig, ignore: frozenset[str] = RESUMABLE_CHANGES) -> list[str]:
    now, old = _comparable(config.flat_dict(), type(config)), _comparable(saved, type(config))
    # a setting added to xtd after the run started reads as its default
    defaults = {
        leaf.key: json.loads(json.dumps(leaf.default))
        for leaf in type(config).leaves()
        if leaf.default is not dataclasses.MISSING and leaf.key not in old
    }
    return sorted(k for k in now if k not in ignore and old.get(k, defaults.get(k)) != now[k])


def _load(path: Path, device: torch.device | str = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never code."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, OSError ...
        text = " ".join(str(exc).split())
        # torch explains weights_only at length; keep the sentence that names the cause.
        cause = re.search(r"(?:Trying to load unsupported|Unsupported) .*?(?= whose |\. |$)", text)
        reason = cause.group(0) if cause else (text.split(". ", 1)[0] or type(exc).__name__)
        raise CheckpointError(
            f"checkpoint file {str(path)!r} cannot be loaded safely ({type(exc).__name__}: {reason[:160]}); "
            f"it is damaged, from an older xtd, or not written by xtd — nothing in it was run. "
            f"Delete that checkpoint folder to resume from an earlier one, or pass {flag('overwrite')} to start afresh"
        ) from None


@dataclass
class LoadedCheckpoint:
    """A checkpoint read and checked (:func:`load_checkpoint`), not yet applied to a model."""

    path: Path
    step: int
    counters: RunCounters
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]


def load_checkpoint(checkpoint: Path, config: TrainConfig) -> LoadedCheckpoint:
    """Read a checkpoint and check it against this run, before any model is built.

    The config comes first (:func:`check_resume_config`); every ``.pt`` file is loaded
    with ``weights_only=True`` onto the CPU. Nothing is changed, so a refused resume
    leaves the run folder as it was.

    Raises:
        ConfigError: the run's settings differ from the checkpoint's.
        CheckpointError: a file that is missing, damaged or not a checkpoint xtd wrote.
    """
    try:
        saved = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} has no readable config.json ({exc})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {str(checkpoint)!r}: config.json is not a JSON object")
    check_resume_config(saved, config, checkpoint)
    state = _load(checkpoint / "state.pt")
    trainable = _load(checkpoint / "trainable.pt")
    optimizer = _load(checkpoint / "optimizer.pt")
    try:
        return LoadedCheckpoint(
            checkpoint, int(state["step"]), RunCounters(**state["counters"]), dict(trainable), dict(optimizer),
            dict(state["rng"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} is not a checkpoint xtd wrote ({type(exc).__name__}: {exc}); "
            f"pass {flag('overwrite')} to start afresh"
        ) from None


def apply_checkpoint(loaded: LoadedCheckpoint, root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Copy a loaded checkpoint into ``root`` and ``optimizer`` and restore the RNG states.

    Raises:
        CheckpointError: the checkpoint's weights or optimizer state do not fit this model.
    """
    params = trainable_parameters(root)
    try:
        if set(loaded.trainable) != set(params):
            raise KeyError(f"weights {sorted(set(params) ^ set(loaded.trainable))[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(loaded.trainable[name])
        optimizer.load_state_dict(loaded.optimizer)
        set_rng_state(loaded.rng)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(loaded.path)!r} does not fit this run ({type(exc).__name__}: {exc}); "
            f"pass {flag('overwrite')} to start afresh"
        ) from None


# --------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------


def inspect_run_folder(out: Path, config: TrainConfig) -> RunPlan:
    """Decide what ``xtd train`` does with ``--out``; writes nothing.

    Returns:
        ``"fresh"`` (new or empty folder, or ``--overwrite`` of a run folder),
        ``"resume"`` (``--resume`` of a run folder), or ``"done"`` (the folder holds this
        very run, finished: a rerun has nothing to do).

    Raises:
        StoreExistsError: a non-empty folder that is not an xtd run folder (whatever the
            flags), or a run folder without ``--resume``/``--overwrite`` that is not this
            finished run.
        OutputError: ``--out`` is a file or cannot be created.
    """
    check_output_folder(out, what=flag("out"))
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    marker = read_run_marker(out)
    if marker is None:
        raise StoreExistsError(
            f"{flag('out')} {str(out)!r} holds files that xtd train did not write ({folder_listing(out)}); "
            "xtd never writes into or deletes them — choose a new or empty folder"
        )
    if config.overwrite:
        return "fresh"
    try:
        saved = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        saved = None
    same = isinstance(saved, dict) and not _changed(saved, config, RESUMABLE_CHANGES - {"max_steps"})
    if same and marker.get("complete") and marker.get("steps") == config.max_steps:
        return "done"
    if config.resume:
        return "resume"
    state = "finished" if marker.get("complete") else "unfinished"
    raise StoreExistsError(
        f"{flag('out')} {str(out)!r} holds an {state} xtd train run"
        + ("" if same else " with other settings")
        + f"; pass {flag('resume')} to continue it or {flag('overwrite')} to start afresh, or choose another folder"
    )


def prepare_run_folder(out: Path, config: TrainConfig) -> None:
    """Create or reset the run folder for a fresh run or a resume (main rank only).

    The marker is written first, so a folder xtd created is recognised even if the run
    is killed at once; ``--overwrite`` removes only the checkpoints and metrics a run
    wrote (and temporary files of killed runs).
    """
    with writing("run folder", out):
        out.mkdir(parents=True, exist_ok=True)
        write_run_marker(out, complete=False, steps=None)
        for leftover in [*out.glob(f"{_STAGING_PREFIX}*"), *out.glob(f".{_STAGING_PREFIX}*")]:  # killed saves
            shutil.rmtree(leftover, ignore_errors=True)
        if config.overwrite:
            for name in (CHECKPOINT_DIR, METRICS_FILE):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        # the run's settings, as `--config FILE` replays them (how it was started is no setting)
        settings = dataclasses.replace(config, resume=False, overwrite=False)
        (out / CONFIG_FILE).write_text(json.dumps(settings.to_dict(), indent=2))


def saved_config(out: Path) -> dict[str, Any]:
    """The settings a run folder was started with (``train_config.json``), for ``--resume``.

    Raises:
        ConfigError: no run folder at ``out``, or its settings file is missing or unreadable.
    """
    if read_run_marker(out) is None:
        raise ConfigError(
            f"{flag('resume')}: {str(out)!r} is no xtd train run folder; give the --out of an earlier run"
        )
    path = out / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag('resume')}: cannot read the saved settings {str(path)!r} ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag('resume')}: {str(path)!r} does not hold a settings object")
    return data


def finish_run_folder(out: Path, steps: int, tokens: int) -> None:
    """Mark the run finished after its model is saved (a rerun then has nothing to do)."""
    with writing("run folder", out):
        write_run_marker(out, complete=True, steps=steps, tokens=tokens)


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    """Append one step's record to ``metrics.jsonl``."""
    with writing("run folder", out), open(out / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics records after ``step`` (written before a kill, replayed after the resume).

    A line a kill cut short is not JSON; it is dropped too.
    """
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def save_model_into(save: Callable[[Path], None], out: Path) -> None:
    """Save the HF folder inside ``out`` under a temporary name, then move its files up.

    ``save(staging)`` writes the model folder; ``out`` keeps the run files beside it.
    """
    staging = out / f"{_STAGING_PREFIX}model-{os.getpid()}"
    with writing("run folder", out, "free space; the checkpoints are kept"):
        try:
            save(staging)
            for path in staging.iterdir():
                target = out / path.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(path, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
