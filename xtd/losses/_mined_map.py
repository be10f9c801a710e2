"""The MinED vocabulary map: each student token → the closest teacher token by byte view.

docs/method.md, "Baselines" (Wan et al.): a student token maps to the teacher token with identical
bytes, else to the teacher token at minimum Levenshtein distance over byte views, ties
to the smallest teacher id. Computed once per tokenizer pair and cached on disk.

Speed (50k × 50k in well under minutes): exact matches by dictionary; all distance-1
neighbours by deletion keys (a one-byte deletion of either side, or the same-position
deletion of both for a substitution); only the rest runs a Levenshtein dynamic programme,
vectorised in numpy over (students × teachers) of one length pair at a time and pruned by
length (|len_s − len_t| is a lower bound on the distance).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["build_mined_map", "tokenizer_bytes_digest"]

logger = logging.getLogger(__name__)

_DP_CELLS = 1 << 24  # students × teachers × (len + 1) per DP slab (32 MB of int16)


def tokenizer_bytes_digest(token_bytes: Sequence[bytes]) -> str:
    """16 hex chars of sha256 over the length-prefixed byte views of a vocabulary."""
    h = hashlib.sha256()
    for b in token_bytes:
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def build_mined_map(
    teacher_token_bytes: Sequence[bytes],
    student_token_bytes: Sequence[bytes],
    *,
    cache_path: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Map every student token to its MinED teacher token.

    Args:
        teacher_token_bytes: byte view of each teacher id (``ByteTokenizer.token_bytes``).
            Empty views (special tokens) are never chosen as a nearest neighbour; to map
            special tokens by name, pass their text (e.g. ``b"<|endoftext|>"``) on both sides.
        student_token_bytes: byte view of each student id.
        cache_path: a folder; the map is saved there as ``mined_<teacher>_<student>.npy``
            (digests of both vocabularies, :func:`tokenizer_bytes_digest`) and loaded from
            it when present.

    Returns:
        (V_S,) int64 teacher id per student id; −1 for empty student views (or an empty
        teacher vocabulary).
    """
    cache_file = None
    if cache_path is not None:
        folder = Path(cache_path)
        cache_file = folder / (
            f"mined_{tokenizer_bytes_digest(teacher_token_bytes)}_{tokenizer_bytes_digest(student_token_bytes)}.npy"
        )
        if cache_file.exists():
            cached = np.load(cache_file)
            if cached.shape == (len(student_token_bytes),):
                logger.info("MinED map loaded from %r", str(cache_file))
                return cached.astype(np.int64)
            logger.warning(
                "ignoring MinED cache %r: shape %s does not match", str(cache_file), cached.shape
            )
    out = _build(list(map(bytes, teacher_token_bytes)), list(map(bytes, student_token_bytes)))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, out)
            os.replace(tmp, cache_file)  # whole file or nothing
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def _first_ids(pairs) -> dict:
    out: dict = {}
    for key, tid in pairs:
        if key not in out:  # ids arrive in ascending order: the first is the smallest
            out[key] = tid
    return out


def _build(teacher: list[bytes], student: list[bytes]) -> np.ndarray:
    out = np.full(len(student), -1, dtype=np.int64)
    nonempty = [(tid, t) for tid, t in enumerate(teacher) if t]
    if not nonempty:
        return out
    exact = _first_ids((t, tid) for tid, t in nonempty)
    del_t = _first_ids((t[:i] + t[i + 1 :], tid) for tid, t in nonempty for i in range(len(t)))
    sub_t = _first_ids(((t[:i] + t[i + 1 :], i), tid) for tid, t in nonempty for i in range(len(t)))
    rest: list[int] = []
    n_exact = n_one = 0
    for sid, s in enumerate(student):
        if not s:
            continue
        hit = exact.get(s)
        if hit is not None:
            out[sid] = hit
            n_exact += 1
            continue
        cands = []
        if s in del_t:  # the teacher token has one extra byte
            cands.append(del_t[s])
        for i in range(len(s)):
            shorter = s[:i] + s[i + 1 :]
            if shorter in exact:  # the teacher token lacks one byte
                cands.append(exact[shorter])
            if (shorter, i) in sub_t:  # one byte substituted
                cands.append(sub_t[(shorter, i)])
        if cands:
            out[sid] = min(cands)
            n_one += 1
        else:
            rest.append(sid)
    if rest:
        _dp_search(nonempty, student, rest, out)
    logger.info(
        "MinED map: %d exact, %d at distance 1, %d by edit-distance search, %d unmapped",
        n_exact,
        n_one,
        len(rest),
        int((out < 0).sum()),
    )
    return out


def _dp_search(
    nonempty: list[tuple[int, bytes]], student: list[bytes], rest: list[int], out: np.ndarray
) -> None:
    """Exact minimum-distance search for students with no teacher token within distance 1."""
    by_len: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
    for tid, t in nonempty:
        by_len[len(t)].append((tid, t))
    buckets = {
        n: (
            np.array([tid for tid, _ in items], dtype=np.int64),
            np.frombuffer(b"".join(t for _, t in items), dtype=np.uint8).reshape(len(items), n),
        )
        for n, items in by_len.items()
    }
    max_len = max(buckets)
    groups: dict[int, list[int]] = defaultdict(list)
    for sid in rest:
        groups[len(student[sid])].append(sid)
    for n, sids in groups.items():
        x = np.frombuffer(b"".join(student[s] for s in sids), dtype=np.uint8).reshape(len(sids), n)
        best = np.full(len(sids), np.iinfo(np.int64).max, dtype=np.int64)
        best_id = np.full(len(sids), -1, dtype=np.int64)
        for delta in range(0, max(n, max_len) + 1):
            # Buckets at |ℓ − n| = δ have distance ≥ δ: only students with best ≥ δ can
            # still improve or tie (and a tie may lower the id).
            active = np.nonzero(best >= delta)[0]
            if active.size == 0:
                break
            for ell in sorted({n - delta, n + delta}):
                if ell not in buckets:
                    continue
                ids, y = buckets[ell]
                dist = _levenshtein_block(x[active], y)  # (A, N)
                j = dist.argmin(axis=1)  # first minimum = smallest id (ids ascend within a bucket)
                d = dist[np.arange(active.size), j].astype(np.int64)
                cand = ids[j]
                better = (d < best[active]) | ((d == best[active]) & (cand < best_id[active]))
                best[active[better]] = d[better]
                best_id[active[better]] = cand[better]
        out[np.asarray(sids)] = best_id


def _levenshtein_block(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(A, N) Levenshtein distances between rows of x (A, n) and rows of y (N, ℓ), uint8 bytes."""
    a, n = x.shape
    m, ell = y.shape
    out = np.empty((a, m), dtype=np.int16)
    step = max(1, _DP_CELLS // max(m * (ell + 1), 1))
    for s in range(0, a, step):
        xs = x[s : s + step]
        k = xs.shape[0]
        prev = np.broadcast_to(np.arange(ell + 1, dtype=np.int16), (k, m, ell + 1)).copy()
        for i in range(1, n + 1):
            cur = np.empty_like(prev)
            cur[:, :, 0] = i
            mismatch = (xs[:, i - 1, None, None] != y[None, :, :]).astype(np.int16)  # (k, N, ℓ)
            np.minimum(prev[:, :, :-1] + mismatch, prev[:, :, 1:] + 1, out=cur[:, :, 1:])
            for j in range(1, ell + 1):  # insertions run along the row
                np.minimum(cur[:, :, j], cur[:, :, j - 1] + 1, out=cur[:, :, j])
            prev = cur
        out[s : s + k] = prev[:, :, ell]
    return out
