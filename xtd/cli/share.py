"""``xtd push`` and ``xtd pull``: copy a finished store to or from any fsspec URL or the Hub.

Both are :func:`xtd.storage.transfer.copy_store`: only what readers read is copied
(committed shards, records, complete alignment caches, the store card), in an order
that leaves an interrupted copy invisible, resumable by rerunning the same command, and
every copied file is read back and checked against the store's checksums.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from xtd.cli._app import command
from xtd.console import console, progress_bar, results

PUSH_EXAMPLES = """
[bold]Examples[/]

  Publish a store to an S3 bucket (pip install 'xtd\\[s3]'; credentials and endpoint as for the AWS CLI):
    [cyan]xtd push runs/teacher.zarr s3://my-bucket/stores/smollm2-kjv[/]

  Publish to a Hugging Face Hub dataset repo (created if missing; HF_TOKEN or `hf auth login`):
    [cyan]xtd push runs/teacher.zarr hf://datasets/my-org/smollm2-kjv-shards --private[/]

  See what would be uploaded, without writing anything:
    [cyan]xtd push runs/teacher.zarr s3://my-bucket/teacher --dry-run --json | jq .stages[/]
"""

PULL_EXAMPLES = """
[bold]Examples[/]

  Copy a published store into a local folder (rerun to resume an interrupted pull):
    [cyan]xtd pull s3://my-bucket/stores/smollm2-kjv shards/teacher.zarr[/]

  From the Hub (or train from it in place: xtd train --store hf://datasets/ORG/NAME ...):
    [cyan]xtd pull hf://datasets/my-org/smollm2-kjv-shards shards/teacher.zarr[/]
"""

_DRY_RUN = Annotated[bool, typer.Option("--dry-run", help="Show the plan (files, bytes, order); write nothing.")]
_JSON = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _copy(verb: str, source: str, dest: str, *, card: str, dry_run: bool, as_json: bool, private: bool) -> None:
    from xtd.storage.transfer import copy_store

    with progress_bar() as bar:
        tasks: dict[str, Any] = {}

        def progress(description: str, advance: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], advance=advance)

        result = copy_store(source, dest, card=card, dry_run=dry_run, progress=progress, private=private)
    plan = result.plan
    summary = plan.to_dict()
    if as_json:
        out = summary if dry_run else {**result.to_dict(), "stages": summary["stages"]}
        typer.echo(json.dumps(out))
        return
    stages = ", ".join(f"{n} {name}" for name, n in summary["stages"].items())
    head = (
        f"{plan.documents:,} documents, {plan.tokens:,} tokens: {len(plan.files):,} files, "
        f"{_fmt_bytes(plan.data_bytes)} ({stages})"
    )
    if dry_run:
        results.print(f"would {verb} {source} → {dest}: {head}", highlight=False)
        for key in summary["keys"][:8]:
            results.print(f"  {key}", highlight=False, markup=False)
        if len(summary["keys"]) > 8:
            results.print(f"  … {len(summary['keys']) - 8} more; the root zarr.json and README.md last", highlight=False)
        return
    if result.nothing_to_do:
        results.print(f"nothing to do: {dest} already holds this store; {result.verified:,} files verified", highlight=False)
        return
    results.print(
        f"{verb}ed {source} → {dest}: {head}; {result.copied:,} written ({_fmt_bytes(result.bytes_copied)}), "
        f"{result.skipped:,} already there, {result.verified:,} verified by crc32c",
        highlight=False,
    )
    if card == "render":
        console.print(f"README.md at {dest} is the store card, written for that URL (xtd inspect {dest} shows it)")


@command("push", epilog=PUSH_EXAMPLES)
def push(
    store: Annotated[str, typer.Argument(help="The finished store: a folder, .zip or fsspec URL.")],
    url: Annotated[
        str, typer.Argument(help="Destination: a folder, an fsspec URL (s3://, gs://, ...) or hf://datasets/ORG/NAME.")
    ],
    private: Annotated[bool, typer.Option(help="Create a missing Hub repo as private.")] = False,
    dry_run: _DRY_RUN = False,
    as_json: _JSON = False,
) -> None:
    """Publish a finished store: copy it to URL, resumable, verified by checksums after the copy.

    Only the store's committed data, its records and a store card (README.md, written for URL)
    are uploaded; the root zarr.json goes last, so an interrupted push leaves no visible store.
    """
    _copy("push", store, url, card="render", dry_run=dry_run, as_json=as_json, private=private)


@command("pull", epilog=PULL_EXAMPLES)
def pull(
    url: Annotated[str, typer.Argument(help="The store to copy: an fsspec URL, hf://datasets/ORG/NAME or a folder.")],
    folder: Annotated[str, typer.Argument(metavar="DIR", help="Local folder to copy it into (empty, or a pull to resume).")],
    dry_run: _DRY_RUN = False,
    as_json: _JSON = False,
) -> None:
    """Copy a published store into a local folder, resumable, verified by checksums after the copy."""
    _copy("pull", url, folder, card="keep", dry_run=dry_run, as_json=as_json, private=False)
