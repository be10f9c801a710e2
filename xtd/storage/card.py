"""The store card: a ``README.md`` at the store root that tells a receiving team what it got.

Like a Hugging Face dataset card, the card is YAML front matter (``pretty_name``,
``tags``, ``size_categories`` and an ``xtd`` block of machine-readable facts) followed by
prose: the teacher and its revision, the tokenizer, the data and its size, the settings,
the stored bytes per token of every array, how to verify the store and the exact
``xtd train`` commands that train from it. Every fact comes from the store's own
metadata (:func:`card_facts`), so the card is a pure function of the store and its URL:
rendering it twice gives the same bytes, and ``xtd inspect`` shows the same facts.

The card is no part of the format's checksummed data: readers and ``xtd verify`` never
look at it, and writers (re)write it when a store is created and whenever a part closes
(:func:`write_card`).
"""

from __future__ import annotations

import json
from typing import Any

from zarr.abc.store import Store
from zarr.core.sync import sync

from xtd.storage.format import (
    PART_ATTR,
    ROOT_ATTR,
    SHARD_ATTR,
    _read_many,
    digest_text,
    group_key,
    read_bytes,
    read_group_attrs,
    tokenizer_vocab_size,
    write_bytes,
)
from xtd.storage.integrity import check_key

__all__ = ["CARD_KEY", "card_facts", "render_card", "write_card", "read_card", "card_status"]

CARD_KEY = "README.md"
"""Key of the card at the store root."""

_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                    (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))


def card_facts(store: Store, url: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the card states, read from the store's metadata (no array is decoded).

    Args:
        store: the open zarr store.
        url: how the store is addressed where the card is read (its commands name it).
        meta: the root ``xtd`` attribute, when the caller has it.

    Returns:
        A JSON-able dict: ``store``, ``teacher``, ``tokenizer``, ``dataset``, ``settings``,
        ``layout``, ``documents``, ``tokens``, ``text_bytes``, ``complete``, ``parts``,
        ``shards``, ``arrays`` (``{name: {"stored_bytes", "bytes_per_token"}}``),
        ``stored_bytes``, ``verify_command``, ``pull_command``, ``train_commands``.
    """
    if meta is None:
        meta = (read_group_attrs(store, "") or {}).get(ROOT_ATTR) or {}
    parts = (meta.get("manifest") or {}).get("parts") or []
    records: dict[str, dict[str, Any] | None] = {}
    shard_keys: list[str] = []
    for part in parts:
        check_key(part, what="part name", where=url)
        record = (read_group_attrs(store, part) or {}).get(PART_ATTR)
        records[part] = record if isinstance(record, dict) else None
        for entry in (record or {}).get("shards") or []:
            name = check_key(entry.get("name"), what="shard name", where=url)
            shard_keys.append(group_key(f"{part}/{name}"))
    stored: dict[str, int] = {}
    for blob in sync(_read_many(store, shard_keys)):
        info = (json.loads(blob)["attributes"].get(SHARD_ATTR) or {}) if blob else {}
        for rel, entry in (info.get("files") or {}).items():
            name = rel.split("/", 1)[0]
            stored[name] = stored.get(name, 0) + int(entry.get("bytes", 0))
    done = [r for r in records.values() if r is not None]
    tokens = sum(int(r.get("tokens_committed", 0)) for r in done)
    tok_json = meta.get("tokenizer_json") or ""
    teacher = meta.get("teacher") if isinstance(meta.get("teacher"), dict) else {}
    layout = meta.get("layout") or {}
    total = sum(stored.values())
    return {
        "store": url,
        "format": f"{meta.get('format')} v{meta.get('format_version')}",
        "xtd_version": meta.get("xtd_version"),
        "complete": bool(records) and all(r is not None and r.get("complete") for r in records.values()),
        "documents": sum(int(r.get("documents_committed", 0)) for r in done),
        "tokens": tokens,
        "text_bytes": sum(int(r.get("bytes_committed", 0)) for r in done),
        "parts": len(parts),
        "shards": len(shard_keys),
        "teacher": teacher,
        "tokenizer": {
            "digest": meta.get("tokenizer_digest") or digest_text(tok_json),
            "vocab_size": tokenizer_vocab_size(tok_json) if tok_json else None,
            "model": _tokenizer_model(tok_json),
        },
        "dataset": meta.get("dataset") or {},
        "settings": meta.get("settings") or {},
        "layout": {k: layout.get(k) for k in ("top_k", "topk_codec", "hidden_size", "shard_tokens")},
        "boundary_classes": list(meta.get("boundary_classes") or []),
        "arrays": {
            name: {"stored_bytes": size, "bytes_per_token": round(size / max(tokens, 1), 3)}
            for name, size in sorted(stored.items(), key=lambda kv: _array_rank(kv[0]))
        },
        "stored_bytes": total,
        "verify_command": f"xtd verify {_quote(url)}",
        "pull_command": f"xtd pull {_quote(url)} ./teacher-store",
        "train_commands": _train_commands(url, teacher, layout),
    }


def _tokenizer_model(tok_json: str) -> str | None:
    try:
        return str(json.loads(tok_json)["model"]["type"])
    except (ValueError, KeyError, TypeError):
        return None


def _quote(text: str) -> str:
    return text if all(c.isalnum() or c in "/._-:@=+" for c in text) else "'" + text.replace("'", "'\\''") + "'"


def _train_commands(url: str, teacher: dict[str, Any], layout: dict[str, Any]) -> dict[str, str]:
    name = _quote(str(teacher.get("name") or "TEACHER"))
    store = _quote(url)
    byte_losses = " --losses alm+sft+latents" if layout.get("hidden_size") else ""
    return {
        "own tokenizer": f"xtd train --store {store} --student ./my-student --out runs/student",
        "teacher moved to bytes": (
            f"xtd train --store {store} --student {name} --tokenizer bytes --out runs/byte-student"
            f"{byte_losses} --untie --lora-rank 0"
        ),
    }


_ORDER = (
    "doc_index doc_token_offsets doc_byte_offsets text token_ids token_spans token_logprob boundary_logmass "
    "topk_ids topk_logprobs topk_floor topk_id_table tail_logmass hidden token_slot loss_span_offsets loss_spans"
).split()


def _array_rank(name: str) -> int:
    return _ORDER.index(name) if name in _ORDER else len(_ORDER)


def _size_category(documents: int) -> str:
    for bound, label in _SIZE_CATEGORIES:
        if documents < bound:
            return label
    return "n>100M"


def _front_matter(facts: dict[str, Any]) -> str:
    import yaml

    teacher = facts["teacher"]
    header = {
        "pretty_name": f"xtd teacher shards of {teacher.get('name') or 'a teacher'}",
        "tags": ["xtd", "knowledge-distillation", "cross-tokenizer-distillation", "zarr"],
        "size_categories": [_size_category(int(facts["documents"]))],
        "xtd": {
            "format": facts["format"],
            "teacher": teacher.get("name"),
            "revision": teacher.get("revision"),
            "tokenizer_digest": facts["tokenizer"]["digest"],
            "documents": facts["documents"],
            "tokens": facts["tokens"],
            "complete": facts["complete"],
        },
    }
    return yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000)


def _cell(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render_card(facts: dict[str, Any]) -> str:
    """The card's text (front matter + Markdown) for :func:`card_facts` output."""
    t, d, tok = facts["teacher"], facts["dataset"], facts["tokenizer"]
    layout = facts["layout"]
    topk = f"{layout['top_k']} ({layout.get('topk_codec')})" if layout.get("top_k") else "none"
    state = (
        "complete"
        if facts["complete"]
        else "**incomplete**: a precompute is running or was interrupted; rerunning it resumes"
    )
    lines = [
        "---",
        _front_matter(facts).rstrip("\n"),
        "---",
        "",
        f"# Teacher shards of {t.get('name') or 'a teacher'}",
        "",
        "An xtd teacher shard store: the teacher ran once over the data below "
        "and stored, per teacher token, the byte span, the realised log-prob and the next-token log-mass of "
        "the boundary classes (plus top-k log-probs and hidden states when listed), so students of any "
        "tokenizer train from it without the teacher (Approximate Likelihood Matching). It is a Zarr v3 "
        f"group (format {facts['format']}), readable with plain `zarr` and `numpy`.",
        "",
        "| | |",
        "|---|---|",
        f"| store | `{facts['store']}` ({state}) |",
        f"| teacher | `{_cell(t.get('name'))}` revision `{_cell(t.get('revision'))}`, weights digest "
        f"`{_cell(t.get('weights_digest'))}`, {_cell(t.get('dtype'))} |",
        f"| tokenizer | {_cell(tok.get('model'))}, {_cell(tok.get('vocab_size'))} ids, digest `{tok['digest']}` |",
        f"| data | `{_cell(d.get('source'))}` ({_cell(d.get('kind'))}; split {_cell(d.get('split'))}, field "
        f"{_cell(d.get('text_field'))}; {_cell(d.get('records'))} records, fingerprint `{_cell(d.get('fingerprint'))}`) |",
        f"| size | {facts['documents']:,} documents, {facts['tokens']:,} tokens, {facts['text_bytes']:,} text bytes; "
        f"{facts['stored_bytes']:,} bytes stored in {facts['shards']} shards of {facts['parts']} part(s) |",
        f"| top-k | {topk} |",
        f"| hidden states | {layout.get('hidden_size') or 'none'} |",
        f"| boundary classes | {', '.join(facts['boundary_classes'])} |",
        f"| settings | `{_cell(facts['settings'])}` |",
        f"| written by | xtd {_cell(facts['xtd_version'])} |",
        "",
        "## Bytes per token",
        "",
        "| array | stored bytes | bytes/token |",
        "|---|---:|---:|",
    ]
    for name, info in facts["arrays"].items():
        lines.append(f"| `{name}` | {info['stored_bytes']:,} | {info['bytes_per_token']:.2f} |")
    lines += [
        f"| **total** | {facts['stored_bytes']:,} | {facts['stored_bytes'] / max(facts['tokens'], 1):.2f} |",
        "",
        "## Verify",
        "",
        "Every file of a committed shard is listed with its size and crc32c; this checks all of them, the "
        "schema, the offsets and the value ranges, and names any damaged file:",
        "",
        "```bash",
        "pip install 'xtd[s3]'    # the extra for s3:// stores; xtd alone reads folders and hf://",
        facts["verify_command"],
        "```",
        "",
        "## Train from it",
        "",
        "Training streams the store where it is (or copy it first: "
        f"`{facts['pull_command']}`). A student with its own tokenizer, and the teacher moved to bytes:",
        "",
        "```bash",
        *facts["train_commands"].values(),
        "```",
        "",
        "In Python: `xtd.storage.open_store(url)` reads the documents; `xtd inspect URL` shows these facts.",
        "",
        "This card is generated by xtd from the store's metadata; `xtd push` rewrites it for the "
        "destination URL.",
        "",
    ]
    return "\n".join(lines)


def write_card(store: Store, url: str, meta: dict[str, Any] | None = None) -> bytes:
    """Render the card of the store and write it to ``README.md`` at its root; returns the bytes."""
    data = render_card(card_facts(store, url, meta)).encode("utf-8")
    write_bytes(store, CARD_KEY, data)
    return data


def read_card(store: Store) -> str | None:
    """The card's text, or None when the store has none (or it is not UTF-8)."""
    blob = read_bytes(store, CARD_KEY)
    if blob is None:
        return None
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        return None


def card_status(store: Store, url: str, meta: dict[str, Any] | None = None) -> str:
    """``"current"``, ``"stale"`` (the card differs from what the store says now) or ``"absent"``."""
    text = read_card(store)
    if text is None:
        return "absent"
    return "current" if text == render_card(card_facts(store, url, meta)) else "stale"
