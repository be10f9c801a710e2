"""Top-k codecs against slow, obvious references, and the documented q8 error bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xtd.storage.codecs import (
    Q8_LO,
    Q8_NEG_INF,
    Q8_STEP,
    codec_params,
    decode_topk,
    encode_topk,
    q8_error_bound,
    q8_undelta,
    topk_stored_dtype,
)


def _q8_reference(x: float) -> int:
    """One value, the obvious way: -inf/NaN → 255, else the nearest of 255 levels on [-20, 0]."""
    if math.isnan(x) or x == -math.inf:
        return 255
    x = min(max(x, -20.0), 0.0)
    best = min(range(255), key=lambda c: abs(-c * (20.0 / 254) - x))
    return best


def _random_logprobs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    x = -rng.exponential(rng.choice([0.5, 3.0, 12.0]), size=(n, k)).astype(np.float32)
    mask = rng.random((n, k))
    x[mask < 0.03] = -np.inf
    x[(mask > 0.03) & (mask < 0.05)] = -rng.uniform(20, 200)  # below the q8 range
    x[(mask > 0.05) & (mask < 0.06)] = 1e-7  # log-softmax rounding noise above 0
    x[(mask > 0.06) & (mask < 0.07)] = 0.0
    return x


@pytest.mark.parametrize("seed", range(20))
def test_q8_matches_reference(seed):
    rng = np.random.default_rng(seed)
    x = _random_logprobs(rng, int(rng.integers(0, 12)), int(rng.integers(1, 9)))
    stored = encode_topk(x, "q8")
    assert stored.dtype == np.uint8 and stored.shape == x.shape
    codes = q8_undelta(stored)
    want = np.vectorize(_q8_reference, otypes=[np.uint8])(x) if x.size else codes
    # Ties at exactly half a level may round either way; allow one level there only.
    diff = np.abs(codes.astype(int) - want.astype(int))
    assert np.all(diff <= 1)
    assert np.mean(diff) < 0.01
    decoded = decode_topk(stored, "q8")
    finite = np.isfinite(x)
    assert np.array_equal(np.isfinite(decoded), finite)
    clamped = np.minimum(np.maximum(x[finite], Q8_LO), 0.0)
    assert np.all(np.abs(decoded[finite] - clamped) <= q8_error_bound() + 1e-6)


def test_q8_bound_is_tight_and_documented():
    x = np.linspace(-20, 0, 100_001, dtype=np.float64).astype(np.float32)[None, :]
    err = np.abs(decode_topk(encode_topk(x, "q8"), "q8") - x)
    assert err.max() <= q8_error_bound() + 1e-6
    assert err.max() > 0.99 * q8_error_bound()  # the bound is the real worst case
    assert abs(q8_error_bound() - 20 / 508) < 1e-12 and abs(Q8_STEP - 20 / 254) < 1e-12
    assert codec_params("q8")["max_abs_error"] == q8_error_bound()


def test_q8_edges():
    x = np.array([[0.0, 1e-3, -np.inf, np.nan, -20.0, -1e9, -Q8_STEP / 2 + 1e-4]], dtype=np.float32)
    stored = encode_topk(x, "q8")
    assert q8_undelta(stored).tolist() == [[0, 0, Q8_NEG_INF, Q8_NEG_INF, 254, 254, 0]]
    assert stored.tolist() == [[0, 0, 255, 0, 255, 0, 2]]  # differences modulo 256
    decoded = decode_topk(stored, "q8")
    assert decoded[0, 0] == 0.0 and decoded[0, 2] == -np.inf and decoded[0, 3] == -np.inf
    assert decoded[0, 4] == pytest.approx(-20.0)
    empty = np.zeros((0, 32), np.float32)
    assert encode_topk(empty, "q8").shape == (0, 32) and decode_topk(
        encode_topk(empty, "q8"), "q8"
    ).shape == (0, 32)


@pytest.mark.parametrize("seed", range(10))
def test_q8_delta_is_exact_for_any_order(seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(int(rng.integers(0, 20)), int(rng.integers(1, 40)))).astype(
        np.uint8
    )
    from xtd.storage.codecs import q8_delta

    stored = q8_delta(codes)
    want = codes.copy()
    for row in range(len(codes)):  # the obvious reference: wrap-around differences
        for j in range(1, codes.shape[1]):
            want[row, j] = (int(codes[row, j]) - int(codes[row, j - 1])) % 256
    np.testing.assert_array_equal(stored, want)
    np.testing.assert_array_equal(q8_undelta(stored), codes)


def test_q8_is_monotone():
    x = np.sort(-np.random.default_rng(0).exponential(4.0, size=5000).astype(np.float32))[None, :]
    decoded = decode_topk(encode_topk(x, "q8"), "q8")
    assert np.all(np.diff(decoded[0]) >= 0)  # order of the top-k is never inverted


@pytest.mark.parametrize("seed", range(10))
def test_fp16_matches_reference(seed):
    rng = np.random.default_rng(seed)
    x = _random_logprobs(rng, 7, 5)
    stored = encode_topk(x, "fp16")
    assert stored.dtype == np.float16
    want = np.array(
        [
            [np.float16(min(v, 0.0)) if not math.isnan(v) else np.float16(-np.inf) for v in row]
            for row in x
        ]
    )
    np.testing.assert_array_equal(stored, want)
    decoded = decode_topk(stored, "fp16")
    finite = np.isfinite(x)
    rel = np.abs(decoded[finite] - np.minimum(x[finite], 0)) / np.maximum(np.abs(x[finite]), 1e-30)
    assert np.all((rel <= 2**-11) | (np.abs(decoded[finite] - np.minimum(x[finite], 0)) < 1e-7))


def test_unknown_codec():
    with pytest.raises(ValueError, match="unknown top-k codec 'q4'"):
        encode_topk(np.zeros((1, 1)), "q4")
    with pytest.raises(ValueError, match="choose one of fp16, q8"):
        topk_stored_dtype("bf16")
