"""Where and in what precision a command runs: device and dtype resolution, once for every verb.

Every command spells precision the same way (:data:`xtd.config.DTYPES`: ``auto``, ``fp32``,
``bf16``, ``fp16``; ``float32``/``bfloat16``/``float16`` are accepted as aliases and stored
in the short form) and names devices the same way (``cpu``, ``cuda``, ``cuda:N``, ``mps``;
``auto`` or none = CUDA when present, the local rank's GPU under ``torchrun``).
"""

from __future__ import annotations

import os

import torch

from xtd.config import DTYPES, canonical_dtype, device_problem
from xtd.errors import ConfigError

__all__ = ["resolve_device", "resolve_dtype", "torch_dtype", "local_rank"]

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def local_rank() -> int | None:
    """This process's GPU index under ``torchrun`` (``LOCAL_RANK``), or None outside it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def resolve_device(spec: str | None = None) -> torch.device:
    """The device a command runs on.

    Args:
        spec: ``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``None`` or ``auto``: CUDA when present
            (``cuda:LOCAL_RANK`` under ``torchrun``), else the CPU.

    Raises:
        ConfigError: an unknown spelling, or CUDA asked for where there is none.
    """
    if spec is None or spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        rank = local_rank()
        return torch.device("cuda" if rank is None else f"cuda:{rank}")
    for problem in device_problem(spec):
        raise ConfigError(problem)
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec} was given but no CUDA device is available; use --device cpu")
    return torch.device(spec)


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """``auto`` → ``bf16`` on CUDA (``fp16`` where bf16 is unsupported), ``fp32`` elsewhere;
    any other spelling → its short form.

    On the CPU ``auto`` is exact fp32: 16-bit autocast is faster on some CPUs but moves
    log-probs by about 1e-2, so it is opt-in.

    Raises:
        ConfigError: not one of :data:`xtd.config.DTYPES` (or an alias).
    """
    name = canonical_dtype(dtype)
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a resolved name (``fp32``, ``bf16``, ``fp16`` or an alias).

    Raises:
        ConfigError: ``auto`` (resolve it first with :func:`resolve_dtype`) or an unknown name.
    """
    name = canonical_dtype(dtype)
    if name not in _TORCH_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} must be resolved to one of {', '.join(d for d in DTYPES if d != 'auto')}")
    return _TORCH_DTYPES[name]
