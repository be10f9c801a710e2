"""The Hugging Face Hub as a destination of ``xtd push`` (``hf://datasets/ORG/NAME``).

Reading needs nothing of this module: ``open_store("hf://datasets/ORG/NAME")`` streams a
store in place through ``huggingface_hub``'s fsspec filesystem. Writing file by file
through that filesystem would make one commit per file, so pushes go through
``HfApi.create_commit`` instead: each write batch of :func:`xtd.storage.transfer.copy_store`
is one commit (data files, shard metadata, part records, and the root ``zarr.json`` with
the card last). The repo is created on the first write when it does not exist (private
with ``private=True``); authentication is ``huggingface_hub``'s (``HF_TOKEN`` or
``hf auth login``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from xtd.errors import ConfigError, OutputError
from xtd.storage.remote import HubLocation, parse_hub_url

__all__ = ["HubDestination", "commit_operations"]


def commit_operations(location: HubLocation, items: dict[str, bytes]) -> list[Any]:
    """The ``CommitOperationAdd`` of each store key (its path inside the repo), in key order."""
    from huggingface_hub import CommitOperationAdd

    return [
        CommitOperationAdd(path_in_repo=location.repo_path(key), path_or_fileobj=data)
        for key, data in sorted(items.items())
    ]


@contextmanager
def _hub_errors(location: HubLocation, doing: str) -> Iterator[None]:
    """``huggingface_hub`` failures (offline, no token, no access, network) as one line."""
    from huggingface_hub import errors

    try:
        yield
    except errors.OfflineModeIsEnabled:
        raise ConfigError(
            f"cannot {doing} {location.url()!r}: HF_HUB_OFFLINE is set — unset it to reach the Hub"
        ) from None
    except errors.HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OutputError(
            f"cannot {doing} {location.url()!r}: {first} — check the repo name and your token "
            "(HF_TOKEN or `hf auth login`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot {doing} {location.url()!r}: {exc}") from None


class HubDestination:
    """A Hub repo folder written in commits (the destination interface of ``copy_store``).

    Args:
        url: ``hf://datasets/ORG/NAME[@REVISION][/FOLDER]``.
        private: create a missing repo as private.
    """

    def __init__(self, url: str, *, private: bool = False) -> None:
        from huggingface_hub import HfApi

        self.location = parse_hub_url(url)
        self.url = self.location.url()
        self.private = private
        self._api = HfApi()
        self._repo_ready = False

    def _kwargs(self) -> dict[str, Any]:
        return {"repo_type": self.location.repo_type, "revision": self.location.revision}

    def listing(self) -> dict[str, int]:
        """Files already in the repo folder: ``{store key: size}`` (empty for a new repo)."""
        from huggingface_hub import errors

        loc = self.location
        try:
            with _hub_errors(loc, "list"):
                entries = list(
                    self._api.list_repo_tree(
                        loc.repo_id, path_in_repo=loc.path_in_repo or None, recursive=True, **self._kwargs()
                    )
                )
        except OutputError as exc:
            if isinstance(exc.__context__, errors.RepositoryNotFoundError):
                return {}
            raise
        self._repo_ready = True
        prefix = f"{loc.path_in_repo}/" if loc.path_in_repo else ""
        return {
            e.path[len(prefix) :]: int(getattr(e, "size", 0) or 0)
            for e in entries
            if hasattr(e, "size") and e.path.startswith(prefix)
        }

    def write(self, items: dict[str, bytes]) -> None:
        """One commit adding ``items`` (store key → bytes); creates the repo first if needed."""
        loc = self.location
        with _hub_errors(loc, "push to"):
            if not self._repo_ready:
                self._api.create_repo(
                    loc.repo_id, repo_type=loc.repo_type, private=self.private, exist_ok=True
                )
                self._repo_ready = True
            self._api.create_commit(
                loc.repo_id,
                operations=commit_operations(loc, items),
                commit_message=f"xtd push: {len(items)} store file(s)",
                **self._kwargs(),
            )

    def read(self, keys: Sequence[str]) -> list[bytes | None]:
        """The bytes of ``keys`` (None where absent), read back through the Hub filesystem."""
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()
        base = self.url.removeprefix("hf://")
        paths = [f"{base}/{k}" for k in keys]
        with _hub_errors(self.location, "read"):
            found = fs.cat(paths, on_error="omit") if paths else {}
        return [found.get(p) for p in paths]

    def remove(self, keys: Sequence[str]) -> None:
        """Nothing to remove: a Hub commit never leaves a partial file."""
        del keys
