"""xtd: cross-tokenizer knowledge distillation with Approximate Likelihood Matching.

The Python API mirrors the command line: each verb is a function in the module of the
same name and takes the frozen config that its command builds::

    from xtd import PrecomputeConfig, TrainConfig, EvalConfig
    from xtd.precompute import precompute
    from xtd.train import train
    from xtd.evaluate import evaluate

    precompute(PrecomputeConfig(out="runs/teacher.zarr", limit=8))
    train(TrainConfig(store=("runs/teacher.zarr",), tokenizer="bytes", out="runs/byte"))
    evaluate(EvalConfig(model=("runs/byte",), held_out=4))

(The verbs are not re-exported here: ``xtd.train`` must stay the module, whatever was
imported first.) Names are imported lazily, so ``import xtd`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("xtd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

_EXPORTS = {
    "PrecomputeResult": "xtd.precompute",
    "TrainResult": "xtd.train",
    "bits_per_byte": "xtd.evaluate",
    "open_store": "xtd.storage",
    "verify_store": "xtd.storage",
    "load_tokenizer": "xtd.tokenization",
    "load_student": "xtd.student",
    "PrecomputeConfig": "xtd.config",
    "TrainConfig": "xtd.config",
    "EvalConfig": "xtd.config",
    "AlignConfig": "xtd.config",
    "XtdError": "xtd.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xtd' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
