"""`xtd inspect` and `xtd verify` through the real typer app (CliRunner)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xtd.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from test_storage import make_docs, write_store  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    url = tmp_path_factory.mktemp("cli") / "store"
    write_store(url, make_docs(3, 12))
    return url


def test_verify_ok(store):
    result = runner.invoke(app, ["verify", str(store)])
    assert result.exit_code == 0, result.output
    assert "ok: 12 documents" in result.output and "files checked" in result.output


def test_verify_names_corrupt_file(tmp_path):
    url = tmp_path / "s"
    write_store(url, make_docs(4, 12))
    victim = url / "part-00000" / "shard-000001" / "token_ids" / "c" / "0"
    blob = bytearray(victim.read_bytes())
    blob[-3] ^= 0x5A
    victim.write_bytes(bytes(blob))
    result = runner.invoke(app, ["verify", str(url)])
    assert result.exit_code == 1, result.output
    assert (
        "part-00000/shard-000001/token_ids/c/0" in result.output
        and "checksum mismatch" in result.output
    )
    assert "Traceback" not in result.output


def test_inspect_tables(store):
    result = runner.invoke(app, ["inspect", str(store), "--doc", "4", "--rows", "5"])
    assert result.exit_code == 0, result.output
    for phrase in (
        "token_ids",
        "topk_logprobs",
        "bytes/token",
        "document 4 (doc_index 13)",
        "boundary log-mass",
        "more rows",
    ):
        assert phrase in result.output, phrase


def test_inspect_json(store):
    result = runner.invoke(app, ["inspect", str(store), "--json", "--doc", "4", "--rows", "3"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["documents"] == 12 and out["complete"] is True and out["top_k"] == 6
    names = [a["name"] for a in out["arrays"]]
    assert {
        "token_ids",
        "token_spans",
        "token_logprob",
        "boundary_logmass",
        "topk_logprobs",
    } <= set(names)
    assert all(a["stored_bytes"] > 0 and a["bytes_per_token"] > 0 for a in out["arrays"])
    assert out["document"]["doc_index"] == 13 and len(out["document"]["token_ids"]) == 3
    assert out["document"]["token_logprob"][0] is None  # NaN row 0 as JSON null


def test_inspect_doc_out_of_range(store):
    result = runner.invoke(app, ["inspect", str(store), "--doc", "99"])
    assert result.exit_code == 1
    assert "--doc 99 is out of range" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("verb", ["inspect", "verify"])
def test_bad_paths_one_line(verb, tmp_path):
    import zarr

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    zarr.create_group(str(tmp_path / "group"))
    (tmp_path / "file.txt").write_text("x")
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "plain"): "is not an xtd store",
        str(tmp_path / "group"): "zarr group but not an xtd teacher store",
        str(tmp_path / "file.txt"): "is a file",
        str(tmp_path / "missing.zip"): "zip file does not exist",
    }
    for path, phrase in cases.items():
        result = runner.invoke(app, [verb, path])
        assert result.exit_code == 1, (path, result.output)
        assert phrase in result.output, (path, result.output)
        assert "Traceback" not in result.output
        assert result.output.strip().startswith("error:")


def test_unknown_version_one_line(tmp_path):
    url = tmp_path / "s"
    write_store(url, make_docs(1, 6))
    meta = json.loads((url / "zarr.json").read_text())
    meta["attributes"]["xtd"]["format_version"] = 7
    (url / "zarr.json").write_text(json.dumps(meta))
    for verb in ("inspect", "verify"):
        result = runner.invoke(app, [verb, str(url)])
        assert result.exit_code == 1
        assert (
            "format_version 7; this xtd reads version 1" in result.output
            and "Traceback" not in result.output
        )


@pytest.mark.parametrize("verb", ["inspect", "verify"])
def test_help_has_examples(verb):
    result = runner.invoke(app, [verb, "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and f"xtd {verb} " in result.output
