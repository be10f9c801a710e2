"""Codecs of the store: top-k log-prob quantisation and the compressor of every array.

Pure functions, no files. Top-k log-probs are stored with a codec chosen by name:

- ``fp16``: float16. Log-probs in [-65504, 0] keep 11 significant bits (relative error
  ≤ 2^-11 ≈ 4.9e-4); -inf stays -inf.
- ``q8``: one byte. Log-probs are clamped to [Q8_LO, 0] = [-20, 0] and rounded to 255
  evenly spaced levels (code c ∈ 0..254 means -c·Δ with Δ = 20/254); code 255 is -inf.
  **Bound**: |decode(encode(x)) - max(x, -20)| ≤ Δ/2 = 20/508 ≈ 0.0394 nats for every
  finite x ≤ 0, i.e. each stored probability is within a factor e^±0.0394 (±4 %) of the
  true one; probabilities below e^-20 ≈ 2e-9 read back as e^-20. NaN is stored as -inf.
  On disk each row holds the codes' differences along K modulo 256 (column 0 holds the
  code itself): top-k rows are sorted, so the differences are small and compress about
  a third better (measured on SmolLM2 outputs, docs/format.md). Decoding is an exact
  ``np.cumsum(stored, axis=1, dtype=np.uint8)`` whatever the order.

The compressors were chosen by measuring bytes per token and decode speed
(``bench/storage.py`` ``metrics["compressors"]``; table in docs/format.md): zstd for
text and offsets; blosc-zstd with byte shuffle for the numeric per-token arrays (the
smallest everywhere, decoding at ≥ 40 MB/s); level 9 for the two top-k arrays, which
are ~85 % of a top-32 store; column-major (transposed) spans and boundary masses.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from zarr.abc.codec import ArrayArrayCodec, BytesBytesCodec
from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

__all__ = [
    "TOPK_CODECS",
    "Q8_LO",
    "Q8_STEP",
    "Q8_NEG_INF",
    "q8_error_bound",
    "q8_delta",
    "q8_undelta",
    "topk_stored_dtype",
    "encode_topk",
    "decode_topk",
    "compressors_for",
    "filters_for",
]

TopkCodec = Literal["fp16", "q8"]
TOPK_CODECS: tuple[str, ...] = ("fp16", "q8")

Q8_LO = -20.0  # e^-20 ≈ 2e-9: below any probability a distillation loss can feel
Q8_LEVELS = 255  # codes 0..254 are finite levels
Q8_STEP = -Q8_LO / (Q8_LEVELS - 1)
Q8_NEG_INF = 255


def q8_error_bound() -> float:
    """Largest |decode(encode(x)) - max(x, Q8_LO)| over finite x ≤ 0: half a level."""
    return Q8_STEP / 2


def topk_stored_dtype(codec: str) -> np.dtype:
    """The on-disk dtype of ``topk_logprobs`` under ``codec``."""
    if codec == "fp16":
        return np.dtype(np.float16)
    if codec == "q8":
        return np.dtype(np.uint8)
    raise ValueError(f"unknown top-k codec {codec!r}; choose one of {', '.join(TOPK_CODECS)}")


def encode_topk(logprobs: np.ndarray, codec: str) -> np.ndarray:
    """Quantise top-k log-probs for storage.

    Args:
        logprobs: (N, K) float log-probs (natural log, ≤ 0; -inf allowed). Positive
            values (rounding noise of a log-softmax) are clamped to 0.
        codec: ``"fp16"`` or ``"q8"``.

    Returns:
        (N, K) array of :func:`topk_stored_dtype` (float16 or uint8).
    """
    x = np.minimum(np.asarray(logprobs, dtype=np.float32), 0.0)
    if codec == "fp16":
        # NaN (never expected) becomes -inf so both codecs decode it alike.
        return np.where(np.isnan(x), -np.inf, x).astype(np.float16)
    if codec == "q8":
        finite = np.isfinite(x)
        clamped = np.where(finite, np.maximum(x, Q8_LO), 0.0)
        codes = np.rint(-clamped / Q8_STEP).astype(np.uint8)  # 0..254
        codes[~finite] = Q8_NEG_INF
        return q8_delta(codes)
    raise ValueError(f"unknown top-k codec {codec!r}; choose one of {', '.join(TOPK_CODECS)}")


def decode_topk(stored: np.ndarray, codec: str) -> np.ndarray:
    """Inverse of :func:`encode_topk`: (N, K) stored values → (N, K) float32 log-probs."""
    if codec == "fp16":
        return np.asarray(stored).astype(np.float32)
    if codec == "q8":
        codes = q8_undelta(np.asarray(stored, dtype=np.uint8))
        out = codes.astype(np.float32) * np.float32(-Q8_STEP)
        out[codes == Q8_NEG_INF] = -np.inf
        return out
    raise ValueError(f"unknown top-k codec {codec!r}; choose one of {', '.join(TOPK_CODECS)}")


def q8_delta(codes: np.ndarray) -> np.ndarray:
    """(N, K) uint8 codes → differences along K modulo 256 (column 0 unchanged)."""
    out = codes.copy()
    if out.ndim == 2 and out.shape[1] > 1:
        out[:, 1:] = codes[:, 1:] - codes[:, :-1]  # uint8 arithmetic wraps modulo 256
    return out


def q8_undelta(stored: np.ndarray) -> np.ndarray:
    """Inverse of :func:`q8_delta`: an exact cumulative sum modulo 256."""
    if stored.ndim == 2 and stored.shape[1] > 1:
        return np.cumsum(stored, axis=1, dtype=np.uint8)
    return stored


def codec_params(codec: str) -> dict[str, Any]:
    """What a plain zarr/numpy reader needs to decode ``topk_logprobs`` (stored in attrs)."""
    if codec == "fp16":
        return {"name": "fp16", "decode": "float32(x)"}
    if codec == "q8":
        return {
            "name": "q8",
            "lo": Q8_LO,
            "step": Q8_STEP,
            "neg_inf_code": Q8_NEG_INF,
            "decode": "codes = cumsum(stored, axis=1, dtype=uint8); value = codes * -step; code 255 = -inf",
            "max_abs_error": q8_error_bound(),
        }
    raise ValueError(f"unknown top-k codec {codec!r}; choose one of {', '.join(TOPK_CODECS)}")


# Measured choices (bench/storage.py, docs/format.md "Compression"): name -> compressor.
_ZSTD = ("zstd", 3)
_LZ4_SHUFFLE = ("blosc-lz4", "shuffle")
_ZSTD_SHUFFLE = ("blosc-zstd", "shuffle")
_ZSTD9_SHUFFLE = ("blosc-zstd9", "shuffle")
COMPRESSOR_CHOICE: dict[str, tuple[str, Any]] = {
    "doc_index": _ZSTD,
    "doc_token_offsets": _ZSTD,
    "doc_byte_offsets": _ZSTD,
    "loss_span_offsets": _ZSTD,
    "loss_spans": _ZSTD,
    "text": _ZSTD,
    "token_ids": _ZSTD_SHUFFLE,
    "token_spans": _ZSTD_SHUFFLE,
    "token_slot": _ZSTD,
    "token_logprob": _ZSTD_SHUFFLE,
    "boundary_logmass": _ZSTD_SHUFFLE,
    "topk_ids": _ZSTD9_SHUFFLE,
    "topk_logprobs": _ZSTD9_SHUFFLE,
    "tail_logmass": _ZSTD_SHUFFLE,
    "hidden": _LZ4_SHUFFLE,
}


def make_compressor(kind: tuple[str, Any], itemsize: int) -> list[BytesBytesCodec]:
    """Zarr compressor list for one ``(name, option)`` choice; ``[]`` for ``("none", _)``."""
    name, option = kind
    if name == "none":
        return []
    if name == "zstd":
        return [ZstdCodec(level=int(option))]
    if name in ("blosc-lz4", "blosc-zstd", "blosc-zstd9"):
        return [
            BloscCodec(
                cname=name.split("-")[1].rstrip("9"),
                clevel=9 if name.endswith("9") else 5,
                shuffle=option,
                typesize=itemsize,
            )
        ]
    raise ValueError(f"unknown compressor {name!r}")


def compressors_for(name: str, dtype: np.dtype) -> list[BytesBytesCodec]:
    """The compressor of array ``name`` (arrays not in the table: zstd level 3)."""
    return make_compressor(COMPRESSOR_CHOICE.get(name, _ZSTD), np.dtype(dtype).itemsize)


def filters_for(name: str) -> list[ArrayArrayCodec]:
    """Array→array filters: spans and boundary masses are stored column-major.

    Within a chunk, consecutive starts differ by a token's length, so a column of starts
    compresses better than interleaved ``(start, end)`` pairs (likewise one class's
    masses); the transpose codec is part of the Zarr v3 spec, so plain readers decode it
    transparently.
    """
    if name in ("token_spans", "loss_spans", "boundary_logmass"):
        return [TransposeCodec(order=(1, 0))]
    return []
