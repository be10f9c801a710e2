"""What a reader may trust: store keys confined to the store, files checked on first read.

A store is shared between teams, so its metadata is input like any other. Two rules
hold for every read of committed data (docs/format.md, "Reading safely"):

1. **Keys stay inside the store.** Every key taken from metadata (part and shard
   names, the file keys of a shard's checksum list, alignment array names) is checked
   by :func:`check_key` before it is opened: relative, ``/``-separated components of
   letters, digits, ``_ . -`` that do not start with a dot, so no ``..``, no absolute
   path, no URL scheme and no drive letter can reach outside the store.
2. **No fill value stands in for data.** :class:`CheckedStore` wraps the zarr store of a
   reader. Each shard registers its checksum list (``xtd_shard.files``) with
   :meth:`CheckedStore.expect`; a listed file that is absent raises
   :class:`~xtd.errors.CorruptShardError` instead of reading as zarr's fill value, and the
   first read of a listed file reads it whole and compares its size and crc32c with the
   list (a range read of an unverified file is served from that whole read). Files are
   checked once per reader; :meth:`CheckedStore.check_present` lists a prefix once to
   find deleted files before anything is read.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from xtd.errors import CorruptShardError, StoreFormatError, XtdError

__all__ = ["check_key", "check_part_record", "decoding", "CheckedStore"]

_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_RECENT_BYTES = 64 << 20  # verified files kept to serve the range reads that follow


def check_key(key: Any, *, what: str, where: str) -> str:
    """Return ``key`` if it is a relative key inside the store; raise otherwise.

    Args:
        key: the key (or one name) taken from store metadata.
        what: what the key names, for the message (``"part name"``, ``"file key"``).
        where: the store, for the message.

    Raises:
        StoreFormatError: absolute, ``..``/``.``, empty components, a scheme, a backslash
            or characters outside letters, digits and ``_ . -``.
    """
    if not isinstance(key, str) or not all(_COMPONENT.fullmatch(c) for c in key.split("/")):
        raise StoreFormatError(
            f"store {where!r}: its metadata gives the {what} {key!r}, which is not a key inside the "
            "store (absolute, '..', a URL scheme or other characters); the metadata is damaged or "
            "crafted — do not use this store"
        )
    return key


def check_part_record(record: Any, part: str, *, where: str) -> dict[str, Any]:
    """Check the shape of a part record (``xtd_part``) and the names it lists.

    Raises:
        StoreFormatError: not an object, no list of shard entries, or a bad shard name.
    """
    shards = record.get("shards") if isinstance(record, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise StoreFormatError(
            f"store {where!r}: {part}/zarr.json holds no valid part record (a list of shard "
            "entries); the store is damaged — run xtd verify"
        )
    for entry in shards:
        check_key(entry.get("name"), what="shard name", where=where)
    return record


@contextmanager
def decoding(where: str, what: str, advice: str) -> Iterator[None]:
    """Any failure to decode (checksum-verified) data becomes one :class:`CorruptShardError`.

    Args:
        where: the store, for the message; what: the data (``"array 'x' of part-…/shard-…"``);
        advice: what to do next.
    """
    try:
        yield
    except XtdError:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr and the codecs raise many types
        raise CorruptShardError(
            f"store {where!r}: {what} does not decode ({type(exc).__name__}: {exc}); {advice}"
        ) from None


class CheckedStore(WrapperStore[Store]):
    """A read-only zarr store wrapper that checks listed files against their checksums.

    Args:
        store: the store to read.
        where: how to name the store in messages (its path or URL).
    """

    def __init__(self, store: Store, *, where: str) -> None:
        super().__init__(store)
        self.where = where
        # key -> (crc32c hex, size, group path, key relative to the group)
        self._expected: dict[str, tuple[str, int, str, str]] = {}
        self._verified: set[str] = set()
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0

    def _with_store(self, store: Store) -> CheckedStore:
        out = CheckedStore(store, where=self.where)
        out._expected = self._expected
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into DataLoader workers: each process checks files on its own first read.
        state = self.__dict__.copy()
        state["_verified"] = set()
        state["_recent"] = OrderedDict()
        state["_recent_bytes"] = 0
        return state

    def expect(self, path: str, files: Mapping[str, Any]) -> None:
        """Register the checksum list of the group at ``path`` (``{rel: {crc32c, bytes}}``).

        Raises:
            StoreFormatError: a file key outside the group, or an entry without crc32c/bytes.
        """
        if not isinstance(files, Mapping):
            raise StoreFormatError(f"store {self.where!r}: {path} has no checksum list; run xtd verify")
        for rel, info in files.items():
            check_key(rel, what="file key", where=self.where)
            try:
                crc, size = str(info["crc32c"]), int(info["bytes"])
            except (KeyError, TypeError, ValueError):
                raise StoreFormatError(
                    f"store {self.where!r}: the checksum entry of {path}/{rel} is malformed; run xtd verify"
                ) from None
            self._expected[f"{path}/{rel}"] = (crc, size, path, rel)

    def check_present(self, prefix: str) -> None:
        """Raise if a listed file under ``prefix`` (a folder, no trailing ``/``) is absent.

        One listing of the prefix, so a deleted chunk is found before any read.
        """
        from xtd.storage.format import list_prefix

        present = set(list_prefix(self._store, f"{prefix}/"))
        missing = [k for k in self._expected if k.startswith(f"{prefix}/") and k not in present]
        if missing:
            raise self._damaged(missing[0], "is missing", more=len(missing) - 1)

    def _damaged(self, key: str, what: str, *, more: int = 0) -> CorruptShardError:
        _, _, path, rel = self._expected[key]
        array, _, rest = rel.partition("/")
        part = f"chunk {rest}" if rest.startswith("c/") else (rest or rel)
        others = f"; {more} more listed files are missing" if more else ""
        return CorruptShardError(
            f"store {self.where!r} is damaged: {key} {what} (array {array!r}, {part}, {path}{others}); "
            f"`xtd verify {self.where}` lists every problem — rebuild the store with xtd precompute "
            "into a new folder, or restore it from its source"
        )

    def _verify(self, key: str, data: bytes) -> None:
        from xtd.storage.format import checksum

        crc, size = self._expected[key][:2]
        if len(data) != size or checksum(data) != crc:
            raise self._damaged(
                key,
                f"does not match its checksum ({len(data)} bytes, crc32c {checksum(data)}; "
                f"recorded {size} bytes, {crc})",
            )
        if key not in self._verified:
            self._verified.add(key)
            if len(data) <= _RECENT_BYTES // 4:
                self._recent[key] = data
                self._recent_bytes += len(data)
                while self._recent_bytes > _RECENT_BYTES:
                    _, old = self._recent.popitem(last=False)
                    self._recent_bytes -= len(old)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if key not in self._expected:
            return await self._store.get(key, prototype, byte_range)
        if byte_range is not None and key in self._verified:
            recent = self._recent.get(key)
            if recent is not None:
                return prototype.buffer.from_bytes(_cut(recent, byte_range))
            part = await self._store.get(key, prototype, byte_range)
            if part is None:
                raise self._damaged(key, "is missing")
            return part
        whole = await self._store.get(key, prototype)
        if whole is None:
            raise self._damaged(key, "is missing")
        data = whole.to_bytes()
        self._verify(key, data)
        return whole if byte_range is None else prototype.buffer.from_bytes(_cut(data, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    def read_checked(self, key: str) -> bytes:
        """The bytes of a listed file, checked (for callers outside zarr)."""
        from zarr.core.buffer import default_buffer_prototype

        buf = sync(self.get(key, default_buffer_prototype()))
        assert buf is not None  # get raises for a missing listed file
        return buf.to_bytes()


def _cut(data: bytes, byte_range: ByteRequest) -> bytes:
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[max(0, len(data) - byte_range.suffix) :]
    raise TypeError(f"unknown byte range {byte_range!r}")
