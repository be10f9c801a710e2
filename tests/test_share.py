"""Sharing stores: precompute into a real local S3 API, stream training from it, push/pull
with checksums, kills mid-run and mid-upload, the store card, the Hub URL and plan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from xtd.cli import app
from xtd.storage import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _s3  # noqa: E402

s3_server, s3_bucket, s3_fs = _s3.s3_server, _s3.s3_bucket, _s3.s3_fs  # the local S3 API fixtures

runner = CliRunner()
ARRAYS = ("token_ids", "token_spans", "token_logprob", "boundary_logmass", "topk_ids", "topk_logprobs", "tail_logmass")


def _run(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def _json(*args: str) -> dict:
    """The one JSON line a --json command prints last (progress lines come before it)."""
    return json.loads(_run(*args).strip().splitlines()[-1])


def _fail(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1, result.output
    return " ".join(result.output.split())


def _texts(n: int, seed: int = 1) -> list[str]:
    words = "the quick brown fox jumps over lazy dogs while kings and queens sleep".split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 40)))) for _ in range(n)]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def assert_same_store(a_url: str, b_url: str) -> None:
    a, b = open_store(a_url), open_store(b_url)
    assert len(a) == len(b) > 0 and a.complete and b.complete
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.text == y.text and x.doc_index == y.doc_index
        for name in ARRAYS:
            if getattr(x, name) is not None or getattr(y, name) is not None:
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


def _committed_s3(key: str) -> int:
    try:
        record = json.loads(s3_fs().cat(key))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int(record["attributes"]["xtd_part"]["documents_committed"])


def _local_store(tiny_lm: Path, tmp_path: Path, n: int = 24) -> Path:
    data = _jsonl(tmp_path / "data.jsonl", _texts(n, seed=3))
    out = tmp_path / "store"
    _run("precompute", "--teacher", str(tiny_lm), "--data", str(data), "--out", str(out), "--top-k", "4",
         "--shard-tokens", "200")  # fmt: skip
    assert open_store(out).num_shards >= min(3, n // 8)
    return out


# ----------------------------------------------------------------------------- precompute on S3


@pytest.mark.slow
def test_precompute_into_s3_killed_resumed_verified_trained_and_pulled(
    s3_bucket: str, tiny_lm: Path, tiny_lm_b: Path, tmp_path: Path
) -> None:
    texts = _texts(60)
    data = _jsonl(tmp_path / "d.jsonl", texts)
    common = ["--teacher", str(tiny_lm), "--data", str(data), "--top-k", "4", "--batch-tokens", "128",
              "--shard-tokens", "250"]  # fmt: skip
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    _run("precompute", *common, "--out", str(ref))
    print(f"ref {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    url = f"s3://{s3_bucket}/store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xtd", "-q", "precompute", *common, "--out", url],
        env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        record = f"{s3_bucket}/store/part-00000/zarr.json"
        while _committed_s3(record) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the kill: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    killed_at = _committed_s3(record)
    print(f"killed {time.perf_counter() - t0:.1f}s")
    assert 0 < killed_at < len(texts)
    assert not open_store(url).complete

    t0 = time.perf_counter()
    summary = _json("precompute", *common, "--out", url, "--json")
    print(f"resume {time.perf_counter() - t0:.1f}s")
    assert summary["documents_resumed"] == killed_at and summary["complete"]
    t0 = time.perf_counter()
    assert "ok: 60 documents" in _run("verify", url)
    print(f"verify {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    assert_same_store(url, str(ref))
    print(f"same {time.perf_counter() - t0:.1f}s")  # the killed-and-resumed store equals an uninterrupted one

    run = tmp_path / "run"
    t0 = time.perf_counter()
    _run("train", "--store", url, "--student", str(tiny_lm_b), "--out", str(run), "--lora-rank", "0",
         "--max-steps", "2", "--warmup-steps", "0", "--batch-size", "4", "--max-student-length", "32",
         "--checkpoint-every", "0")  # fmt: skip
    print(f"train {time.perf_counter() - t0:.1f}s")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    pulled = tmp_path / "pulled"
    t0 = time.perf_counter()
    assert "verified by crc32c" in " ".join(_run("pull", url, str(pulled)).split())
    print(f"pull {time.perf_counter() - t0:.1f}s")
    assert_same_store(str(pulled), str(ref))
    assert "ok: 60 documents" in _run("verify", str(pulled))


# ----------------------------------------------------------------------------- push / pull


def test_push_pull_round_trip_with_checksums_and_a_corrupt_object_named(
    s3_bucket: str, tiny_lm: Path, tmp_path: Path
) -> None:
    store = _local_store(tiny_lm, tmp_path)
    # Things a reader never reads must not be uploaded: a stray file and an orphan shard.
    (store / "notes.txt").write_text("private notes")
    orphan = store / "part-00000" / "shard-000099"
    orphan.mkdir()
    (orphan / "junk").write_bytes(b"half-written")
    url = f"s3://{s3_bucket}/pub/teacher"

    plan = _json("push", str(store), url, "--dry-run", "--json")
    assert not s3_fs().exists(f"{s3_bucket}/pub")  # a dry run writes nothing
    out = _json("push", str(store), url, "--json")
    assert out["copied"] == out["files"] == out["verified"] == plan["files"] and not out["nothing_to_do"]
    uploaded = sorted(p.split("/pub/teacher/", 1)[1] for p in s3_fs().find(f"{s3_bucket}/pub/teacher"))
    assert uploaded == sorted(plan["keys"])
    assert "notes.txt" not in uploaded and not any("shard-000099" in k for k in uploaded)
    assert plan["keys"][-2:] == ["zarr.json", "README.md"]  # the root and the card go last
    card = s3_fs().cat(f"{s3_bucket}/pub/teacher/README.md").decode()
    assert f"xtd train --store {url}" in card and f"xtd verify {url}" in card

    again = _json("push", str(store), url, "--json")
    assert again["nothing_to_do"] and again["skipped"] == again["files"]

    pulled = tmp_path / "pulled"
    _run("pull", url, str(pulled))
    for key in plan["keys"]:
        if key != "README.md":
            assert (pulled / key).read_bytes() == (store / key).read_bytes(), key
    assert (pulled / "README.md").read_text() == card  # pull keeps the publisher's card
    assert not (pulled / "notes.txt").exists()
    assert_same_store(str(pulled), str(store))
    assert "nothing to do" in _run("pull", url, str(pulled))

    # A corrupted object in the bucket: verify names it, pull refuses to copy it.
    key = "part-00000/shard-000001/token_logprob/c/0"
    fs = s3_fs()
    blob = bytearray(fs.cat(f"{s3_bucket}/pub/teacher/{key}"))
    blob[len(blob) // 2] ^= 0x40
    fs.pipe(f"{s3_bucket}/pub/teacher/{key}", bytes(blob))
    message = _fail("verify", url)
    assert key in message and "checksum mismatch" in message
    message = _fail("pull", url, str(tmp_path / "pulled-bad"))
    assert key in message and "damaged" in message
    assert not (tmp_path / "pulled-bad" / "zarr.json").exists()


def _push_and_die(source: str, dest: str) -> None:
    """Subprocess body: push in batches of 4 files and SIGKILL this process after the first."""
    from xtd.storage.transfer import copy_store

    copy_store(source, dest, batch_files=4, on_batch=lambda n: os.kill(os.getpid(), signal.SIGKILL))


@pytest.mark.parametrize("remote", ["s3", "folder"])
def test_killed_push_leaves_no_store_and_resumes(remote: str, tiny_lm: Path, tmp_path: Path, request) -> None:  # noqa: ANN001
    store = _local_store(tiny_lm, tmp_path)
    if remote == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}/x/teacher"
    else:
        url = str(tmp_path / "remote" / "teacher")
    code = "import sys; sys.path.insert(0, sys.argv[3]); import test_share; test_share._push_and_die(sys.argv[1], sys.argv[2])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(store), url, str(Path(__file__).parent)],
        env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if remote == "s3":
        present = [p for p in s3_fs().find(url.removeprefix("s3://"))]
    else:
        present = [str(p) for p in Path(url).rglob("*") if p.is_file()]
    assert 0 < len(present) <= 4 and not any(p.endswith("/zarr.json") and p.count("/") <= 3 for p in present)
    message = _fail("verify", url)  # half a copy is no store
    assert "no store" in message or "not an xtd store" in message
    out = _json("push", str(store), url, "--json")
    assert out["skipped"] == len(present) and out["copied"] == out["files"] - len(present)
    assert out["verified"] == out["files"]
    assert "ok:" in _run("verify", url)
    assert_same_store(url, str(store))


def test_pull_resumes_after_a_kill_and_removes_its_temporary_files(tiny_lm: Path, tmp_path: Path) -> None:
    store = _local_store(tiny_lm, tmp_path)
    remote = tmp_path / "remote"
    _run("push", str(store), str(remote))
    into = tmp_path / "into"
    _run("pull", str(remote), str(into))
    # What a pull killed mid-way leaves: some files, a temporary one, no root zarr.json.
    (into / "zarr.json").unlink()
    (into / "README.md").unlink()
    victim = into / "part-00000" / "shard-000002" / "token_ids" / "c" / "0"
    victim.rename(victim.with_name("0.xtd-tmp"))
    out = _json("pull", str(remote), str(into), "--json")
    assert out["copied"] == 3 and out["verified"] == out["files"]
    assert not list(into.rglob("*.xtd-tmp"))
    assert_same_store(str(into), str(store))


def test_copy_refuses_foreign_destinations_and_incomplete_stores(tiny_lm: Path, tmp_path: Path) -> None:
    store = _local_store(tiny_lm, tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    assert "not part of this store" in _fail("push", str(store), str(foreign))
    assert (foreign / "thesis.tex").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    other = _jsonl(tmp_path / "other.jsonl", _texts(5, seed=9))
    other_store = tmp_path / "other"
    _run("precompute", "--teacher", str(tiny_lm), "--data", str(other), "--out", str(other_store), "--top-k", "0")
    remote = tmp_path / "remote"
    _run("push", str(store), str(remote))
    assert "holds another store" in _fail("push", str(other_store), str(remote))
    assert "same place" in _fail("push", str(store), str(store))
    # An unfinished store is not published.
    part = store / "part-00000" / "zarr.json"
    meta = json.loads(part.read_text())
    meta["attributes"]["xtd_part"]["complete"] = False
    part.write_text(json.dumps(meta))
    assert "incomplete" in _fail("push", str(store), str(tmp_path / "elsewhere"))


def test_missing_s3_extra_is_one_line_naming_it(tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.registry import _registry

    store = _local_store(tiny_lm, tmp_path, n=4)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    for proto in ("s3", "s3a"):
        if proto in _registry:
            monkeypatch.delitem(_registry, proto)
    for args in (["push", str(store), "s3://b/x"], ["pull", "s3://b/x", str(tmp_path / "p")],
                 ["verify", "s3://b/x"], ["inspect", "s3://b/x"]):  # fmt: skip
        assert "pip install 'xtd[s3]'" in _fail(*args)


# ----------------------------------------------------------------------------- card, Hub


def test_every_new_store_has_a_card_and_inspect_shows_it(tiny_lm: Path, tmp_path: Path) -> None:
    store = _local_store(tiny_lm, tmp_path, n=6)
    card = (store / "README.md").read_text()
    front, body = card.split("---\n", 2)[1:]
    import yaml

    header = yaml.safe_load(front)
    reader = open_store(store)
    assert header["xtd"]["documents"] == len(reader) and header["xtd"]["tokens"] == reader.num_tokens
    assert header["xtd"]["complete"] is True and header["xtd"]["teacher"] == str(tiny_lm)
    assert "xtd-teacher-shards v1" in header["xtd"]["format"] and "size_categories" in header
    for phrase in (f"xtd verify {store}", f"xtd train --store {store}", "Bytes per token", "`token_logprob`"):
        assert phrase in body, phrase
    assert "ok:" in _run("verify", str(store))  # the card does not disturb verify
    shown = " ".join(_run("inspect", str(store), "--rows", "2").split())
    for phrase in ("card", "README.md (current)", f"xtd train --store {store}", f"xtd verify {store}", "tokenizer"):
        assert phrase in shown, phrase
    facts = _json("inspect", str(store), "--json")["card"]
    assert facts["documents"] == len(reader) and facts["status"] == "current"
    assert facts["arrays"]["token_logprob"]["stored_bytes"] > 0


def test_hub_urls_and_the_upload_plan_offline(tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xtd.errors import ConfigError
    from xtd.storage.hub import commit_operations
    from xtd.storage.remote import parse_hub_url
    from xtd.storage.transfer import plan_transfer

    loc = parse_hub_url("hf://datasets/my-org/kjv.shards@v1/teacher/a")
    assert (loc.repo_id, loc.repo_type, loc.revision, loc.path_in_repo) == ("my-org/kjv.shards", "dataset", "v1", "teacher/a")
    assert loc.url() == "hf://datasets/my-org/kjv.shards@v1/teacher/a" and loc.repo_path("zarr.json") == "teacher/a/zarr.json"
    assert parse_hub_url("hf://datasets/o/n/").path_in_repo == "" and parse_hub_url("hf://datasets/o/n").revision is None
    for bad in ("hf://o/n", "hf://datasets/only-org", "hf://datasets/o/n/../x", "s3://datasets/o/n"):
        with pytest.raises(ConfigError):
            parse_hub_url(bad)
    store = _local_store(tiny_lm, tmp_path, n=6)
    plan, opened = plan_transfer(str(store), "hf://datasets/my-org/kjv")
    opened.close()
    assert [f.stage for f in plan.files] == sorted(f.stage for f in plan.files)
    assert b"hf://datasets/my-org/kjv" in plan.card
    ops = commit_operations(parse_hub_url("hf://datasets/my-org/kjv/sub"), {"zarr.json": b"{}", "README.md": b"x"})
    assert [op.path_in_repo for op in ops] == ["sub/README.md", "sub/zarr.json"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in _fail("push", str(store), "hf://datasets/my-org/kjv", "--dry-run")
