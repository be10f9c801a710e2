"""Cutting long sequences into windows and packing sequences into batches.

One window planner serves every forward pass over text longer than a model's window —
the teacher in ``xtd precompute`` and every model in ``xtd eval`` — and one packer groups
sequences into batches, longest first (the teacher's batches, ``xtd eval``'s windows, the
micro-batches of a training step). :func:`pack_rows` places sequences side by side in rows of
a fixed width (a training step's padding-free forward).

**Windows.** A sequence of ``N`` tokens is cut into windows of at most ``max_length``
tokens. Window 0 is ``[0, L)``; each next window starts ``context`` tokens before the
previous one ended, ``[e − context, min(e − context + L, N))``, and contributes only its
new rows ``[e, …)``. Every row lies in exactly one window's new rows, every row after
window 0 sees at least ``context`` tokens before it, and nothing is truncated; the cost is
``context / (L − context)`` extra forward tokens. ``--stride`` is this ``context`` in
every command.
"""

from __future__ import annotations

from collections.abc import Sequence

from xtd.errors import ConfigError

__all__ = ["pack_longest_first", "pack_rows", "plan_windows"]


def plan_windows(num_tokens: int, max_length: int, context: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, new_from)`` over ``num_tokens`` rows (module docstring).

    Each row lies in exactly one ``[new_from, end)``; ``new_from − start`` is the context
    carried over (``context`` for every window after the first). An empty sequence has
    one empty window.

    Raises:
        ConfigError: ``max_length < 2`` or ``context`` outside ``[1, max_length)``.
    """
    if max_length < 2 or not 1 <= context < max_length:
        raise ConfigError(
            f"windows need --max-length ≥ 2 and 1 ≤ --stride < --max-length, got {max_length} and {context}"
        )
    if num_tokens <= max_length:
        return [(0, num_tokens, 0)]
    windows = [(0, max_length, 0)]
    end = max_length
    while end < num_tokens:
        start = end - context
        new_end = min(start + max_length, num_tokens)
        windows.append((start, new_end, end))
        end = new_end
    return windows


def pack_longest_first(
    lengths: Sequence[int], *, max_tokens: int | None = None, max_items: int | None = None
) -> list[list[int]]:
    """Group sequences into batches, longest first, each padded to its first (longest) one.

    A batch takes the next sequence while it holds fewer than ``max_items`` and, with a
    token budget, while ``(items + 1) × its longest length ≤ max_tokens``; a sequence
    longer than the budget is a batch of its own. Ties keep input order, so the plan is a
    pure function of ``lengths``; longest first also means a batch too large for memory
    fails at the start, not after hours.

    Returns:
        Lists of indices into ``lengths``, every index exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        fits = (
            batch is not None
            and (max_items is None or len(batch) < max_items)
            and (max_tokens is None or (len(batch) + 1) * lengths[batch[0]] <= max_tokens)
        )
        if fits:
            batch.append(i)
        else:
            batches.append([i])
    return batches


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Place sequences side by side in rows of ``capacity`` tokens, first fit, longest first.

    Each sequence goes into the first row (in creation order) with room for it, else
    into a new row; within a row the sequences keep the order they were placed in. Empty
    sequences are left out. A pure function of its arguments.

    Returns:
        Per row, the indices into ``lengths`` it holds.

    Raises:
        ConfigError: a sequence longer than ``capacity``.
    """
    if any(n > capacity for n in lengths):
        raise ConfigError(f"a sequence of {max(lengths)} tokens does not fit in rows of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n <= 0:
            continue
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows
