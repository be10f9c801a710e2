"""Top-k codecs and the top-k row layout against slow, obvious references; the q8 bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xtd.storage.codecs import (
    Q8_LO,
    Q8_NEG_INF,
    Q8_STEP,
    TOPK_CODECS,
    canonical_topk,
    codec_params,
    decode_topk,
    encode_topk,
    ids_to_ranks,
    pack_topk,
    q8_error_bound,
    ranks_to_ids,
    topk_stored_dtype,
    unpack_topk,
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
    codes = stored
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
    assert stored.tolist() == [[0, 0, Q8_NEG_INF, Q8_NEG_INF, 254, 254, 0]]
    decoded = decode_topk(stored, "q8")
    assert decoded[0, 0] == 0.0 and decoded[0, 2] == -np.inf and decoded[0, 3] == -np.inf
    assert decoded[0, 4] == pytest.approx(-20.0)
    empty = np.zeros((0, 32), np.float32)
    assert encode_topk(empty, "q8").shape == (0, 32) and decode_topk(
        encode_topk(empty, "q8"), "q8"
    ).shape == (0, 32)


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


# ------------------------------------------------------------------ row layout (pack/unpack)


def _order_reference(value: float, codec: str) -> float:
    """Sort position of one quantised value: q8 code, or -x for fp16 (-inf last)."""
    return float(value) if codec == "q8" else -float(value)


def _canonical_reference(ids: np.ndarray, values: np.ndarray, codec: str) -> tuple[list, list]:
    """Each row's (id, value) pairs sorted the obvious way: by log-prob, then by id."""
    out_ids, out_values = [], []
    for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True):
        pairs = sorted(
            zip(row_ids, row_values, strict=True),
            key=lambda p: (_order_reference(p[1], codec), p[0]),
        )
        out_ids.append([p[0] for p in pairs])
        out_values.append([_order_reference(p[1], codec) for p in pairs])
    return out_ids, out_values


def _rank_reference(i: int, table: list[int]) -> int:
    if i in table:
        return table.index(i)
    return len(table) + sum(1 for v in range(i) if v not in table)


@pytest.mark.parametrize("lut_max", [1 << 24, 0])  # 0: the closed form for huge ranks
@pytest.mark.parametrize("seed", range(30))
def test_ranks_match_reference_and_invert(seed, lut_max, monkeypatch):
    monkeypatch.setattr("xtd.storage.codecs._LUT_MAX", lut_max)
    rng = np.random.default_rng(seed)
    table = rng.choice(60, size=int(rng.integers(0, 20)), replace=False).astype(np.int32)
    ids = rng.integers(0, 80, size=(int(rng.integers(0, 6)), int(rng.integers(1, 7))))
    ranks = ids_to_ranks(ids, table)
    want = [[_rank_reference(int(i), table.tolist()) for i in row] for row in ids]
    assert ranks.tolist() == want
    np.testing.assert_array_equal(ranks_to_ids(ranks, table), ids)
    assert ranks_to_ids(ranks, table).dtype == np.int32


@pytest.mark.parametrize("codec", TOPK_CODECS)
@pytest.mark.parametrize("seed", range(25))
def test_pack_unpack_matches_reference(codec, seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(0, 25)), int(rng.integers(1, 40))
    vocab = int(rng.choice([5, 50, 70_000]))  # 5: many repeated ids; 70,000: beyond uint16
    ids = rng.integers(0, vocab, size=(n, k)).astype(np.int32)
    x = _random_logprobs(rng, n, k)
    if n and rng.random() < 0.5:
        x[0] = x[0, 0]  # a row of ties
    values = encode_topk(x, codec)
    stored = pack_topk(ids, values, codec, table_max=int(rng.choice([0, 3, 4096])))
    assert stored["topk_ids"].dtype == np.int32 and stored["topk_ids"].shape == (n, k)
    assert stored["topk_logprobs"].dtype == topk_stored_dtype(codec)
    assert (codec == "q8") == ("topk_floor" in stored)
    got_ids, got_values = unpack_topk(stored, codec)
    want_ids, want_order = _canonical_reference(ids, values, codec)
    assert got_ids.dtype == np.int32 and got_ids.tolist() == want_ids
    assert [[_order_reference(v, codec) for v in row] for row in got_values.tolist()] == want_order
    # Every pair survives exactly: same multiset of (id, value) per row.
    for r in range(n):
        assert sorted(zip(got_ids[r].tolist(), got_values[r].tolist(), strict=True)) == sorted(
            zip(ids[r].tolist(), values[r].tolist(), strict=True)
        )
    # Any slice of rows decodes on its own (random access) to the same rows.
    if n:
        a, b = sorted(rng.integers(0, n + 1, size=2))
        part = {name: arr if name == "topk_id_table" else arr[a:b] for name, arr in stored.items()}
        part_ids, part_values = unpack_topk(part, codec)
        np.testing.assert_array_equal(part_ids, got_ids[a:b])
        np.testing.assert_array_equal(part_values, got_values[a:b])
    # The q8 bound holds through the layout: compare with the true values of each pair.
    if codec == "q8" and n:
        decoded = decode_topk(got_values, codec)
        for r in range(n):
            truth = sorted(
                zip(
                    ids[r].tolist(),
                    decode_topk(values, codec)[r].tolist(),
                    x[r].tolist(),
                    strict=True,
                )
            )
            for (i, _, xv), (gi, gd) in zip(
                truth,
                sorted(zip(got_ids[r].tolist(), decoded[r].tolist(), strict=True)),
                strict=True,
            ):
                assert i == gi
                if math.isfinite(xv):
                    assert abs(gd - min(max(xv, -20.0), 0.0)) <= q8_error_bound() + 1e-6


def test_tie_order_is_ascending_id():
    x = np.array([[-1.0, -3.0, -1.0, -1.0, -3.0, -np.inf, -np.inf]], dtype=np.float32)
    ids = np.array([[9, 4, 2, 7, 1, 30, 5]])
    for codec in TOPK_CODECS:
        got_ids, got_values = unpack_topk(pack_topk(ids, encode_topk(x, codec), codec), codec)
        assert got_ids.tolist() == [[2, 7, 9, 1, 4, 5, 30]], codec
        decoded = decode_topk(got_values, codec)[0]
        assert decoded[-1] == -np.inf and np.all(np.diff(decoded[:-2]) <= 0)
    # fp16: 0.0 and -0.0 are one value, hence a tie ordered by id.
    z = np.array([[-0.0, 0.0, -0.0]], dtype=np.float32)
    ids = np.array([[8, 3, 5]])
    got_ids, got_values = canonical_topk(ids, encode_topk(z, "fp16"), "fp16")
    assert got_ids.tolist() == [[3, 5, 8]] and np.all(got_values == 0)


def test_pack_ignores_input_order_of_distinct_ids():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(1000, size=16, replace=False) for _ in range(50)])
    values = encode_topk(-np.sort(rng.exponential(2.0, size=(50, 16)), axis=1), "q8")
    perm = rng.permutation(16)
    a = pack_topk(ids, values, "q8")
    b = pack_topk(ids[:, perm], values[:, perm], "q8")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_pack_layout_details():
    # Rows hold rank differences; the table lists the most frequent ids first (ties by id).
    ids = np.array([[7, 3, 100], [3, 7, 5]])
    codes = np.array([[0, 10, 20], [5, 5, 9]], dtype=np.uint8)
    stored = pack_topk(ids, codes, "q8", table_max=2)
    assert stored["topk_id_table"].tolist() == [3, 7]
    # ranks: 3 -> 0, 7 -> 1; 100 -> 2 + 98 (ids below 100 outside the table); 5 -> 2 + 4.
    assert stored["topk_ids"].tolist() == [[0, 1, 100 - 1], [0, 1, 6 - 1]]
    assert stored["topk_floor"].tolist() == [20, 9]
    assert stored["topk_logprobs"].tolist() == [[10, 20, 0], [4, 4, 0]]


def test_empty_and_single_column():
    for codec in TOPK_CODECS:
        stored = pack_topk(np.zeros((0, 4), np.int32), encode_topk(np.zeros((0, 4)), codec), codec)
        ids, values = unpack_topk(stored, codec)
        assert ids.shape == (0, 4) and values.shape == (0, 4) and len(stored["topk_id_table"]) == 0
        ids, values = unpack_topk(
            pack_topk(
                np.array([[4], [2]]), encode_topk(np.array([[-1.0], [-np.inf]]), codec), codec
            ),
            codec,
        )
        assert ids.tolist() == [[4], [2]]
        assert decode_topk(values, codec)[1, 0] == -np.inf
