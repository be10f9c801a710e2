"""Torch datasets over a teacher store (imported lazily: storage works without torch).

Items are :class:`xtd.storage.Document` objects holding numpy arrays; batching and
padding belong to the trainer's collate function.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.utils.data

from xtd.storage.format import Document
from xtd.storage.reader import StoreReader

__all__ = ["DocumentDataset", "DocumentStream"]


class DocumentDataset(torch.utils.data.Dataset):
    """Map-style dataset: item ``d`` is document ``d`` in global (``doc_index``) order."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, d: int) -> Document:
        return self.reader[d]


class DocumentStream(torch.utils.data.IterableDataset):
    """Streams a contiguous block of documents per (rank, DataLoader worker).

    Documents ``[D·i/P, D·(i+1)/P)`` go to stream ``i`` of ``P = world_size × workers``,
    so each shard is decoded by one stream and memory stays bounded by the reader's
    shard cache.
    """

    def __init__(self, reader: StoreReader, *, rank: int = 0, world_size: int = 1) -> None:
        self.reader = reader
        self.rank = rank
        self.world_size = world_size

    def _block(self) -> range:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        parts = self.world_size * workers
        i = self.rank * workers + worker
        n = len(self.reader)
        return range(n * i // parts, n * (i + 1) // parts)

    def __iter__(self) -> Iterator[Document]:
        return self.reader.iter_documents(self._block())
