"""Copy a finished store between a folder, an object store and the Hub: ``xtd push`` / ``xtd pull``.

What is copied is exactly what a reader reads, nothing else (:func:`plan_transfer`): the
root ``zarr.json``, each part record, each committed shard's ``zarr.json`` and the files
its checksum list names, complete cached alignment groups, and the store card
(``README.md``). Orphans of an interrupted writer, temporary files and anything else in
the source folder are never uploaded.

Order makes a half-copied store invisible: data files first, then the shard metadata,
then the part records, and the root ``zarr.json`` and the card last, so a reader of an
interrupted copy finds no store at all. Each file is one atomic write (an object PUT; in a
local folder a ``.xtd-tmp`` file renamed into place; on the Hub, commits of many files,
the last one holding every record). Rerunning the same copy resumes: data files already
at the destination with their size are skipped, metadata is compared by content, and
leftover ``.xtd-tmp`` files are removed. After the copy every destination file is read
back and its crc32c compared with the source's (and the source's with the checksums its
metadata records), so a copy that ends without an error is byte-identical.

A destination is written only when it is empty, holds an interrupted copy of this store
(nothing but files of the plan), or holds this store or an earlier state of it (the same
identity: teacher, tokenizer, settings, layout).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zarr.core.sync import sync

from xtd.errors import ConfigError, CorruptShardError, StoreExistsError, StoreFormatError
from xtd.outputs import check_output_folder, writing
from xtd.storage.card import CARD_KEY, card_facts, render_card
from xtd.storage.format import (
    ALIGNMENT_ATTR,
    PART_ATTR,
    ROOT_ATTR,
    SHARD_ATTR,
    _read_many,
    checksum,
    group_key,
    list_dir,
    open_zarr_store,
    read_bytes,
    read_group_attrs,
    read_root_meta,
)
from xtd.storage.identity import EXTENDABLE, identity
from xtd.storage.integrity import check_key, check_part_record
from xtd.storage.remote import is_remote, local_path, missing_package_error, scheme

__all__ = ["TransferFile", "TransferPlan", "TransferResult", "plan_transfer", "copy_store", "TMP_SUFFIX"]

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".xtd-tmp"
"""Suffix of a local file being written; renamed into place when whole."""
_BATCH_BYTES = 64 << 20
_BATCH_FILES = 256
# Files a Hub dataset repo has from its creation, which a store upload leaves alone.
_HUB_EXTRAS = (".gitattributes",)

Progress = Callable[[str, int, int], None]
"""``progress(description, advance, total)``: files done, called with 0 first."""


@dataclasses.dataclass(frozen=True)
class TransferFile:
    """One file of a store to copy.

    Attributes:
        key: its key in the store (``part-00000/shard-000000/token_ids/c/0``).
        stage: copy order: 0 data files, 1 shard/alignment metadata, 2 part records,
            3 the root ``zarr.json`` and the card.
        crc32c, size: what the store's metadata records for it (None for the root and
            part records, which no record covers: they are compared with the source bytes).
    """

    key: str
    stage: int
    crc32c: str | None = None
    size: int | None = None


@dataclasses.dataclass
class TransferPlan:
    """What a copy will write: every file, in order, and the card."""

    source: str
    dest: str
    files: list[TransferFile]
    card: bytes
    documents: int
    tokens: int
    data_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Summary for ``--dry-run``/``--json``: counts per stage and the first keys."""
        stages = ["data files", "shard metadata", "part records", "root and card"]
        return {
            "source": self.source,
            "dest": self.dest,
            "documents": self.documents,
            "tokens": self.tokens,
            "files": len(self.files),
            "bytes": self.data_bytes,
            "stages": {stages[s]: sum(f.stage == s for f in self.files) for s in range(4)},
            "keys": [f.key for f in self.files],
        }


@dataclasses.dataclass
class TransferResult:
    """Outcome of :func:`copy_store`."""

    plan: TransferPlan
    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    verified: int = 0
    removed_tmp: int = 0

    @property
    def nothing_to_do(self) -> bool:
        """The destination already held every file: nothing was written."""
        return self.copied == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``--json``."""
        return {
            "source": self.plan.source,
            "dest": self.plan.dest,
            "files": len(self.plan.files),
            "copied": self.copied,
            "skipped": self.skipped,
            "bytes_copied": self.bytes_copied,
            "verified": self.verified,
            "nothing_to_do": self.nothing_to_do,
            "documents": self.plan.documents,
            "tokens": self.plan.tokens,
        }


# --------------------------------------------------------------------------- planning


def plan_transfer(source: str, dest: str, *, card: str = "render") -> tuple[TransferPlan, Any]:
    """Read a finished store's metadata and list every file a copy writes.

    Args:
        source: the store (folder, ``.zip``, any fsspec URL).
        dest: where it goes (used for the card and messages).
        card: ``"render"`` writes a card rendered for ``dest`` (push); ``"keep"`` copies
            the source's card, rendering one only when it has none (pull).

    Returns:
        ``(plan, open source zarr store)``; the caller closes the store.

    Raises:
        StoreNotFoundError, StoreFormatError: no xtd store at ``source``.
        ConfigError: the store is incomplete (a precompute is unfinished).
    """
    store = open_zarr_store(source, writable=False)
    meta = read_root_meta(store, source)
    files: list[TransferFile] = []
    documents = tokens = 0
    parts = (meta.get("manifest") or {}).get("parts")
    if not isinstance(parts, list) or not parts:
        raise StoreFormatError(f"store {source!r}: the root manifest lists no parts")
    for part in parts:
        check_key(part, what="part name", where=source)
        record = (read_group_attrs(store, part) or {}).get(PART_ATTR)
        if not isinstance(record, dict) or not record.get("complete"):
            raise ConfigError(
                f"store {source!r} is incomplete ({part} is not finished): rerun its xtd precompute "
                "to finish it, then copy it"
            )
        check_part_record(record, part, where=source)
        documents += int(record.get("documents_committed", 0))
        tokens += int(record.get("tokens_committed", 0))
        entries = [(f"{part}/{e['name']}", e) for e in record["shards"]]
        blobs = sync(_read_many(store, [group_key(path) for path, _ in entries]))
        for (path, entry), blob in zip(entries, blobs, strict=True):
            if blob is None or checksum(blob) != entry.get("zarr_json_crc32c"):
                raise CorruptShardError(
                    f"store {source!r} is damaged: {group_key(path)} is missing or does not match its part "
                    f"record; run xtd verify {source}"
                )
            listed = (json.loads(blob).get("attributes") or {}).get(SHARD_ATTR, {}).get("files") or {}
            files += _listed(path, listed, source)
            files.append(TransferFile(group_key(path), 1, entry["zarr_json_crc32c"], len(blob)))
        files.append(TransferFile(group_key(part), 2))
    for digest in list_dir(store, "alignments/"):
        path = f"alignments/{check_key(digest, what='alignment group', where=source)}"
        info = (read_group_attrs(store, path) or {}).get(ALIGNMENT_ATTR)
        if isinstance(info, dict) and info.get("complete"):  # an unfinished group is no data
            files += _listed(path, info.get("files") or {}, source)
            files.append(TransferFile(group_key(path), 1))
    files.append(TransferFile(group_key(""), 3))
    card_bytes = read_bytes(store, CARD_KEY) if card == "keep" else None
    if card_bytes is None:
        card_bytes = render_card(card_facts(store, dest, meta)).encode("utf-8")
    files.append(TransferFile(CARD_KEY, 3))
    files.sort(key=lambda f: f.stage)  # the write order (stable within a stage)
    data_bytes = sum(f.size or 0 for f in files)
    return TransferPlan(source, dest, files, card_bytes, documents, tokens, data_bytes), store


def _listed(path: str, listed: dict[str, Any], source: str) -> list[TransferFile]:
    out = []
    for rel, info in sorted(listed.items()):
        check_key(rel, what=f"file key of {path}", where=source)
        out.append(TransferFile(f"{path}/{rel}", 0, info.get("crc32c"), info.get("bytes")))
    return out


# --------------------------------------------------------------------------- destinations


class _Folder:
    """A local destination folder: each file written to ``.xtd-tmp`` and renamed into place."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.root = local_path(url)
        check_output_folder(self.root, what="destination")

    def listing(self) -> dict[str, int]:
        if not self.root.is_dir():
            return {}
        return {
            p.relative_to(self.root).as_posix(): p.stat().st_size for p in self.root.rglob("*") if p.is_file()
        }

    def write(self, items: dict[str, bytes]) -> None:
        with writing("destination", self.url, "free space or choose another destination; rerun to resume"):
            for key, data in items.items():
                target = self.root / key
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + TMP_SUFFIX)
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)

    def read(self, keys: Sequence[str]) -> list[bytes | None]:
        out = []
        for key in keys:
            path = self.root / key
            out.append(path.read_bytes() if path.is_file() else None)
        return out

    def remove(self, keys: Sequence[str]) -> None:
        for key in keys:
            (self.root / key).unlink(missing_ok=True)


class _Fsspec:
    """Any fsspec destination where one object write is atomic (S3, GCS, Azure, memory)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.url_to_fs(self.url, use_listings_cache=False)
        except ImportError as exc:
            raise missing_package_error(url, exc) from None
        except ValueError as exc:
            raise ConfigError(f"cannot open {url!r}: {exc}; use a local path or an fsspec URL") from None
        self.root = self.root.rstrip("/")

    def listing(self) -> dict[str, int]:
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root + "/"
        return {
            path[len(prefix) :]: int(info.get("size") or 0)
            for path, info in found.items()
            if path.startswith(prefix) and info.get("type", "file") == "file"
        }

    def write(self, items: dict[str, bytes]) -> None:
        with writing("destination", self.url, "check the destination and rerun to resume"):
            self.fs.pipe({f"{self.root}/{k}": v for k, v in items.items()})
        self.fs.invalidate_cache(self.root)

    def read(self, keys: Sequence[str]) -> list[bytes | None]:
        paths = [f"{self.root}/{k}" for k in keys]
        found = self.fs.cat(paths, on_error="omit") if paths else {}
        return [found.get(p) for p in paths]

    def remove(self, keys: Sequence[str]) -> None:
        if keys:
            self.fs.rm([f"{self.root}/{k}" for k in keys])


def _destination(url: str, *, private: bool = False) -> Any:
    if scheme(url) == "hf":
        from xtd.storage.hub import HubDestination

        return HubDestination(url, private=private)
    return _Fsspec(url) if is_remote(url) else _Folder(url)


# --------------------------------------------------------------------------- copying


def copy_store(
    source: str,
    dest: str,
    *,
    card: str = "render",
    dry_run: bool = False,
    progress: Progress | None = None,
    batch_files: int = _BATCH_FILES,
    on_batch: Callable[[int], None] | None = None,
    private: bool = False,
) -> TransferResult:
    """Copy the finished store at ``source`` to ``dest`` (module docstring), resumably.

    Args:
        source, dest: store locations (folder, ``.zip`` source, fsspec URL, ``hf://``).
        card: ``"render"`` (push: a card for ``dest``) or ``"keep"`` (pull: the source's card).
        dry_run: plan and check the destination, write nothing.
        progress: ``progress(description, files, total)``.
        batch_files: files per write batch (a resumed copy redoes at most one batch).
        on_batch: called with the number of files written after each batch.
        private: a Hub repo that does not exist yet is created private.

    Raises:
        StoreExistsError: the destination holds other files or another store.
        CorruptShardError: a source file that does not match its recorded checksum, or a
            destination file that still differs after being rewritten.
        ConfigError, StoreNotFoundError, StoreFormatError, OutputError: bad input, one line.
    """
    if _same_place(source, dest):
        raise ConfigError(f"source and destination are the same place ({source!r}); choose another destination")
    plan, store = plan_transfer(source, dest, card=card)
    try:
        target = _destination(dest, private=private)
        existing = target.listing()
        leftovers = [k for k in existing if k.endswith(TMP_SUFFIX)]
        _check_destination(plan, target, existing, store)
        result = TransferResult(plan)
        if dry_run:
            return result
        if leftovers:
            target.remove(leftovers)  # ours: files an interrupted copy did not finish
            result.removed_tmp = len(leftovers)
        total = len(plan.files)
        if progress is not None:
            progress("copying", 0, total)
        for stage in range(4):
            todo = [f for f in plan.files if f.stage == stage]
            for start in range(0, len(todo), batch_files):
                batch = todo[start : start + batch_files]
                if stage == 0:  # immutable data files: present with their size means copied
                    missing = [f for f in batch if f.size is None or existing.get(f.key) != f.size]
                    write = _source_bytes(store, plan, missing)
                else:  # records may change (an extended store): compare content
                    data = _source_bytes(store, plan, batch)
                    current = dict(zip([f.key for f in batch], target.read([f.key for f in batch]), strict=True))
                    write = {f.key: data[f.key] for f in batch if current[f.key] != data[f.key]}
                for group in _chunks(write):
                    target.write(group)
                result.copied += len(write)
                result.skipped += len(batch) - len(write)
                result.bytes_copied += sum(len(v) for v in write.values())
                if progress is not None:
                    progress("copying", len(batch), total)
                if on_batch is not None and write:
                    on_batch(len(write))
        result.verified = _verify_copy(store, plan, target, progress)
        return result
    finally:
        store.close()


def _same_place(source: str, dest: str) -> bool:
    from xtd.outputs import canonical_location

    return canonical_location(source) == canonical_location(dest)


def _chunks(items: dict[str, bytes]) -> list[dict[str, bytes]]:
    groups: list[dict[str, bytes]] = [{}]
    size = 0
    for key, value in items.items():
        if groups[-1] and size + len(value) > _BATCH_BYTES:
            groups.append({})
            size = 0
        groups[-1][key] = value
        size += len(value)
    return [g for g in groups if g]


def _source_bytes(store: Any, plan: TransferPlan, batch: list[TransferFile]) -> dict[str, bytes]:
    """The bytes of ``batch`` from the source, each checked against its recorded checksum."""
    keys = [f.key for f in batch if f.key != CARD_KEY]
    blobs = dict(zip(keys, sync(_read_many(store, keys)), strict=True))
    out: dict[str, bytes] = {}
    for f in batch:
        blob = plan.card if f.key == CARD_KEY else blobs[f.key]
        bad = blob is None or (
            f.crc32c is not None and (checksum(blob) != f.crc32c or (f.size is not None and len(blob) != f.size))
        )
        if bad:
            what = "is missing" if blob is None else "does not match the checksum its metadata records"
            raise CorruptShardError(
                f"store {plan.source!r} is damaged: {f.key} {what}; nothing damaged is copied — run "
                f"xtd verify {plan.source}"
            )
        out[f.key] = blob  # type: ignore[assignment]
    return out


def _check_destination(plan: TransferPlan, target: Any, existing: dict[str, int], store: Any) -> None:
    """Refuse a destination that holds anything but (an earlier state of) this store."""
    if group_key("") in existing:
        (theirs,) = target.read([group_key("")])
        ours = read_bytes(store, group_key(""))
        try:
            their_meta = json.loads(theirs or b"")["attributes"][ROOT_ATTR]
            our_meta = json.loads(ours or b"")["attributes"][ROOT_ATTR]
            same = theirs == ours or identity(their_meta, EXTENDABLE) == identity(our_meta, EXTENDABLE)
        except (ValueError, KeyError, TypeError):
            same = False
        if not same:
            raise StoreExistsError(
                f"destination {plan.dest!r} holds another store (other teacher, data, settings or layout); "
                "choose another destination"
            )
    planned = {f.key for f in plan.files}
    foreign = sorted(
        k for k in existing if k not in planned and not k.endswith(TMP_SUFFIX) and k not in _HUB_EXTRAS
    )
    if foreign:
        shown = ", ".join(repr(k) for k in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise StoreExistsError(
            f"destination {plan.dest!r} holds files that are not part of this store ({shown}); xtd copies a "
            "store only into an empty place or over a copy of the same store — choose another destination"
        )


def _verify_copy(store: Any, plan: TransferPlan, target: Any, progress: Progress | None) -> int:
    """Read every destination file back and compare its crc32c with the one the store records
    (or, for the root, part records and card, with the source's bytes); rewrite a mismatch
    once, then fail naming it."""
    total = len(plan.files)
    if progress is not None:
        progress("verifying", 0, total)
    verified = 0
    for start in range(0, total, _BATCH_FILES):
        batch = plan.files[start : start + _BATCH_FILES]
        unrecorded = _source_bytes(store, plan, [f for f in batch if f.crc32c is None])
        expected = {f.key: f.crc32c or checksum(unrecorded[f.key]) for f in batch}
        keys = [f.key for f in batch]
        got = dict(zip(keys, target.read(keys), strict=True))
        wrong = [f for f in batch if got[f.key] is None or checksum(got[f.key]) != expected[f.key]]
        if wrong:
            bad = _source_bytes(store, plan, wrong)
            logger.warning("%d copied file(s) differ from the source; writing them again", len(bad))
            target.write(bad)
            again = dict(zip(list(bad), target.read(list(bad)), strict=True))
            still = [k for k in bad if again[k] is None or checksum(again[k]) != checksum(bad[k])]
            if still:
                raise CorruptShardError(
                    f"destination {plan.dest!r}: {still[0]} differs from the source after being written "
                    f"twice ({len(still)} file(s)); the destination does not store what it is sent"
                )
        verified += len(batch)
        if progress is not None:
            progress("verifying", len(batch), total)
    return verified


def default_pull_dir(url: str) -> Path:
    """A folder name for ``xtd pull URL`` without DIR: the URL's last component."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split("@", 1)[0] or "store"
    return Path(name)
