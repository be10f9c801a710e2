"""Where and in what precision a command runs: device and dtype resolution, once for every verb.

Every command spells precision the same way (:data:`xtd.config.DTYPES`: ``auto``, ``fp32``,
``bf16``, ``fp16``; ``float32``/``bfloat16``/``float16`` are accepted as aliases and stored
in the short form) and names devices the same way (``cpu``, ``cuda``, ``cuda:N``, ``mps``;
``auto`` or none = CUDA when present, the local rank's GPU under ``torchrun``).

Under ``torchrun`` (``WORLD_SIZE`` > 1) :class:`Distributed` joins the process group and
sums values and gradients across ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from xtd.config import DTYPES, canonical_dtype, device_problem
from xtd.errors import ConfigError

__all__ = ["Distributed", "resolve_device", "resolve_dtype", "torch_dtype", "local_rank"]

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


@dataclass
class Distributed:
    """This process's place in a data-parallel run (``torchrun``), and the sums across ranks.

    Attributes:
        rank, world_size: from the process group (``RANK``/``WORLD_SIZE`` under torchrun).
        device: where this rank runs (:func:`resolve_device`).
        owns_group: this object created the process group (and destroys it in :meth:`close`).
    """

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str) -> Distributed:
        """Join (or create) the process group that torchrun describes; one rank outside it."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        owns = False
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
            owns = True
        if dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank=rank, world_size=world, device=dev, owns_group=owns)

    @property
    def main(self) -> bool:
        """Rank 0: the rank that writes files and logs."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum floats over ranks (float64, so counts stay exact)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over ranks (one all-reduce of the flattened grads)."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
