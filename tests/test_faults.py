"""Fault injection: a table of bad inputs, damaged stores and hostile files against every command.

Each case builds its inputs in a fresh folder (a copy of a real store written by a tiny
real teacher, a real finished run folder, real data files), damages or crafts what it
names, runs one ``xtd`` command through typer's CliRunner and asserts:

- exit code 1, exactly one ``error:`` line, holding the phrase that names the problem;
- no traceback;
- every file that existed before is byte for byte unchanged, and nothing new appears
  outside the one path the command may write (its ``--out``).

Case ids start with the command (``train-...``); ``tests/conftest.py`` prints the count
of cases per command at the end of the run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from xtd.cli import app

runner = CliRunner()

TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end",
    "Hello world! Tabs\tand  spaces, emoji 👍 and 你好.",
    "The heart-ache and the thousand natural shocks\nThat flesh is heir to: 'tis a consummation",
    "Devoutly to be wish'd. To die, to sleep;\nTo sleep: perchance to dream: ay, there's the rub;",
]
# Every array of a top-k (q8) store, each damaged three ways below.
ARRAYS = (
    "doc_index", "doc_token_offsets", "doc_byte_offsets", "text", "token_ids", "token_spans",
    "token_logprob", "boundary_logmass", "topk_ids", "topk_logprobs", "topk_floor", "topk_id_table",
    "tail_logmass",
)  # fmt: skip
ALM_ARRAYS = ("token_spans", "token_logprob", "boundary_logmass")
TOPK_ARRAYS = ("topk_ids", "topk_logprobs", "topk_floor", "topk_id_table", "tail_logmass")


@dataclass
class Env:
    """What every case may copy: a real store, a finished run folder, models, data."""

    root: Path
    store: Path
    run: Path
    teacher: Path
    student: Path


@dataclass
class Run:
    """One invocation: the arguments, the phrase its error line must hold, what it may write."""

    args: list[str]
    phrase: str
    may_write: Path | None = None
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    check: Callable[[], None] | None = None
    never: tuple[str, ...] = ()
    """Phrases the output must not hold (a suggestion of --overwrite, a temporary name)."""


# ----------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path, tiny_lm_b: Path) -> Env:
    from xtd.config import PrecomputeConfig, TrainConfig
    from xtd.precompute import precompute
    from xtd.storage import open_store
    from xtd.train import train

    root = tmp_path_factory.mktemp("faults")
    data = _jsonl(root / "data.jsonl", TEXTS * 2)
    store = root / "store"
    precompute(PrecomputeConfig(teacher=str(tiny_lm), data=str(data), out=str(store), top_k=4, shard_tokens=200))
    assert open_store(store).num_shards >= 3
    run = root / "run"
    train(TrainConfig(store=(str(store),), student=str(tiny_lm_b), out=str(run), **_TRAIN))
    return Env(root, store, run, tiny_lm, tiny_lm_b)


_TRAIN: dict[str, Any] = dict(
    lora_rank=0, max_steps=1, warmup_steps=0, batch_size=2, max_student_length=32, checkpoint_every=0
)


def _train_args(env: Env, store: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--store", str(store), "--student", str(env.student), "--out", str(out), "--lora-rank", "0",
        "--max-steps", "1", "--warmup-steps", "0", "--batch-size", "2", "--max-student-length", "32",
        "--checkpoint-every", "0", *extra,
    ]  # fmt: skip


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _store(env: Env, case: Path) -> Path:
    return Path(shutil.copytree(env.store, case / "store"))


def _chunks(store: Path, array: str, *, every_shard: bool = False) -> list[Path]:
    shards = sorted((store / "part-00000").glob("shard-*"))
    files = []
    for shard in shards if every_shard else shards[:1]:
        files += sorted(p for p in (shard / array / "c").rglob("*") if p.is_file())
    assert files, (array, store)
    return files


def _damage(store: Path, array: str, how: str, *, every_shard: bool = False) -> str:
    """Damage the chunk file(s) of ``array``; returns the key of the first, relative to the store."""
    files = _chunks(store, array, every_shard=every_shard)
    for path in files:
        blob = path.read_bytes()
        if how == "deleted":
            path.unlink()
        elif how == "truncated":
            path.write_bytes(blob[: len(blob) // 2])
        else:  # a flipped bit in the middle of the file
            mid = len(blob) // 2
            path.write_bytes(blob[:mid] + bytes([blob[mid] ^ 0x10]) + blob[mid + 1 :])
    return files[0].relative_to(store).as_posix()


def _edit_json(path: Path, edit: Callable[[dict], None]) -> bytes:
    meta = json.loads(path.read_text())
    edit(meta)
    data = json.dumps(meta, indent=1).encode()
    path.write_bytes(data)
    return data


def _rechecksum_shard(store: Path, shard: str, data: bytes) -> None:
    """Make a crafted shard zarr.json consistent with its part record (as an attacker would)."""
    from xtd.storage.format import checksum

    def edit(meta: dict) -> None:
        for entry in meta["attributes"]["xtd_part"]["shards"]:
            if entry["name"] == shard:
                entry["zarr_json_crc32c"] = checksum(data)

    _edit_json(store / "part-00000" / "zarr.json", edit)


def _user_folder(case: Path, name: str = "mine") -> Path:
    folder = case / name
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("my notes")
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "sub" / "data.bin").write_bytes(os.urandom(64))
    return folder


def _full_disk_after(writes: int) -> Callable[[pytest.MonkeyPatch], None]:
    """Let ``writes`` store writes through, then fail like a full disk (ENOSPC)."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        from zarr.storage import LocalStore

        original = LocalStore.set
        count = {"n": 0}

        async def set_(self, key, value):  # noqa: ANN001, ANN202
            count["n"] += 1
            if count["n"] > writes:
                raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.root) / key))
            return await original(self, key, value)

        monkeypatch.setattr(LocalStore, "set", set_)

    return patch


def _no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", "/run/.tmp-step-00000002-1/trainable.pt")


# sysfs takes no new folders from anyone, root included: a real read-only --out on Linux.
_SUGGESTS = ("--overwrite", "--resume")  # never offered for a folder xtd did not write
_READ_ONLY = Path("/sys/xtd-fault-injection")
_ON_LINUX = Path("/sys/kernel").is_dir()


# ----------------------------------------------------------------------------- the table


def _precompute_cases() -> dict[str, Callable[[Env, Path], Run]]:
    def base(env: Env, data: Path, out: Path | str, *extra: str) -> list[str]:
        return ["precompute", "--teacher", str(env.teacher), "--data", str(data), "--out", str(out), "--top-k", "2", *extra]

    def good(case: Path) -> Path:
        return _jsonl(case / "d.jsonl", TEXTS[:3])

    cases: dict[str, Callable[[Env, Path], Run]] = {
        "foreign-folder-overwrite": lambda env, case: Run(
            base(env, good(case), _user_folder(case), "--overwrite"), "is not an xtd store", never=_SUGGESTS
        ),
        "foreign-folder": lambda env, case: Run(
            base(env, good(case), _user_folder(case)), "never deletes", never=_SUGGESTS
        ),
        "out-is-a-file": lambda env, case: Run(
            base(env, good(case), _write(case / "out.txt", b"x")), "is a file"
        ),
        "out-under-a-file": lambda env, case: Run(
            base(env, good(case), _write(case / "f", b"x") / "store"), "is a file"
        ),
        "truncated-root-zarr-json-overwrite": lambda env, case: Run(
            base(env, good(case), _truncated_root(_store(env, case)), "--overwrite"), "cannot be read"
        ),
        "s3-without-s3fs": lambda env, case: Run(
            base(env, good(case), "s3://bucket/x"), "pip install 'xtd[s3]'", patch=_without_s3fs
        ),
        "lone-surrogate": lambda env, case: Run(
            base(env, _write(case / "d.jsonl", b'{"text": "a \\ud800 b"}\n'), case / "out"), "lone surrogate",
            may_write=case / "out",
        ),
        "invalid-utf8": lambda env, case: Run(
            base(env, _write(case / "d.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n'), case / "out"),
            "is not valid UTF-8 at byte 25", may_write=case / "out",
        ),
        "bad-json-line": lambda env, case: Run(
            base(env, _write(case / "d.jsonl", b'{"text": "ok"}\n{"text": \n'), case / "out"), "line 2",
            may_write=case / "out",
        ),
        "missing-field": lambda env, case: Run(
            base(env, _write(case / "d.jsonl", b'{"body": "x"}\n'), case / "out"), "'body'", may_write=case / "out"
        ),
        "empty-data": lambda env, case: Run(base(env, _write(case / "d.jsonl", b""), case / "out"), "is empty"),
        "all-records-empty": lambda env, case: Run(
            base(env, _jsonl(case / "d.jsonl", ["", ""]), case / "out"), "all of them are empty"
        ),
        "missing-data": lambda env, case: Run(base(env, case / "nope.jsonl", case / "out"), "does not exist"),
        "limit-zero": lambda env, case: Run(base(env, good(case), case / "out", "--limit", "0"), "--limit (0)"),
        "top-k-above-vocabulary": lambda env, case: Run(
            base(env, good(case), case / "out", "--top-k", "100000"), "larger than the teacher vocabulary"
        ),
        "not-an-integer": lambda env, case: Run(
            base(env, good(case), case / "out", "--max-length", "two"), "'--max-length'"
        ),
        "unknown-flag": lambda env, case: Run(base(env, good(case), case / "out", "--bogus"), "--bogus"),
        "full-disk": lambda env, case: Run(
            base(env, good(case), case / "out", "--shard-tokens", "20"), "No space left on device",
            may_write=case / "out", patch=_full_disk_after(6), never=("partial", "/c/"),
        ),
        "other-settings": lambda env, case: Run(
            base(env, _jsonl(case / "d.jsonl", TEXTS * 2), _store(env, case)), "other settings"
        ),
    }
    if _ON_LINUX:
        cases["read-only-out"] = lambda env, case: Run(
            base(env, good(case), _READ_ONLY / "store"), "cannot write"
        )
    return cases


def _store_cases(verb: str) -> dict[str, Callable[[Env, Path], Run]]:
    """Damaged and crafted stores, for a command that takes the store as its argument."""

    def args(store: Path) -> list[str]:
        if verb == "align":
            return ["align", "--cache", str(store), "--student-tokenizer", "bytes"]
        return [verb, str(store)]

    def damaged(array: str, how: str) -> Callable[[Env, Path], Run]:
        def build(env: Env, case: Path) -> Run:
            store = _store(env, case)
            key = _damage(store, array, how)
            return Run(args(store), key)

        return build

    cases = {f"{how}-{array}": damaged(array, how) for array in ARRAYS for how in ("deleted", "truncated", "flipped")}
    if verb == "align":  # one of each is enough: align reads through the same reader
        cases = {k: v for k, v in cases.items() if k.endswith(("token_spans", "text"))}
    cases.update(_metadata_cases(args))
    return cases


def _metadata_cases(args: Callable[[Path], list[str]]) -> dict[str, Callable[[Env, Path], Run]]:
    def part_named(name: Callable[[Path], str]) -> Callable[[Env, Path], Run]:
        def build(env: Env, case: Path) -> Run:
            store = _store(env, case)
            outside = Path(shutil.copytree(store / "part-00000", case / "outside-part"))  # readable, if escaped to
            target = name(outside)
            _edit_json(store / "zarr.json", lambda m: m["attributes"]["xtd"]["manifest"].update(parts=[target]))
            return Run(args(store), "not a key inside the store")

        return build

    def shard_named(env: Env, case: Path) -> Run:
        store = _store(env, case)
        shutil.copytree(store / "part-00000" / "shard-000000", case / "escaped-shard")
        _edit_json(
            store / "part-00000" / "zarr.json",
            lambda m: m["attributes"]["xtd_part"]["shards"][0].update(name="../../escaped-shard"),
        )
        return Run(args(store), "not a key inside the store")

    def file_key(env: Env, case: Path) -> Run:
        store = _store(env, case)
        _write(case / "secret", b"not yours")
        shard = store / "part-00000" / "shard-000000"
        data = _edit_json(
            shard / "zarr.json",
            lambda m: m["attributes"]["xtd_shard"]["files"].update(
                {"../../../secret": {"crc32c": "00000000", "bytes": 9}}
            ),
        )
        _rechecksum_shard(store, "shard-000000", data)
        return Run(args(store), "not a key inside the store")

    def truncated(rel: str, phrase: str) -> Callable[[Env, Path], Run]:
        def build(env: Env, case: Path) -> Run:
            store = _store(env, case)
            _truncate(store / rel)
            return Run(args(store), phrase)

        return build

    def foreign(env: Env, case: Path) -> Run:
        return Run(args(_user_folder(case)), "is not an xtd store")

    return {
        "part-named-dotdot": part_named(lambda outside: "../outside-part"),
        "part-named-absolute": part_named(lambda outside: str(outside)),
        "part-named-url": part_named(lambda outside: "file:///" + str(outside)),
        "shard-named-dotdot": shard_named,
        "file-key-dotdot": file_key,
        "truncated-root-zarr-json": truncated("zarr.json", "not valid JSON"),
        "truncated-part-zarr-json": truncated("part-00000/zarr.json", "not valid JSON"),
        "truncated-shard-zarr-json": truncated("part-00000/shard-000001/zarr.json", "shard-000001/zarr.json"),
        "truncated-array-zarr-json": truncated(
            "part-00000/shard-000000/token_logprob/zarr.json", "token_logprob/zarr.json"
        ),
        "foreign-folder": foreign,
        "missing-store": lambda env, case: Run(args(case / "nope"), "does not exist"),
    }


def _train_cases() -> dict[str, Callable[[Env, Path], Run]]:
    def damaged(array: str, how: str, *extra: str) -> Callable[[Env, Path], Run]:
        def build(env: Env, case: Path) -> Run:
            store = _store(env, case)
            key = _damage(store, array, how, every_shard=True)  # whichever shard is read first
            return Run(_train_args(env, store, case / "run", *extra), key.split("/", 2)[2], may_write=case / "run")

        return build

    def resume(damage: Callable[[Path, Path], None], phrase: str) -> Callable[[Env, Path], Run]:
        def build(env: Env, case: Path) -> Run:
            run = Path(shutil.copytree(env.run, case / "run"))
            ckpt = run / "checkpoints" / "step-00000001"
            damage(ckpt, case)
            args = _train_args(env, env.store, run, "--resume")
            args[args.index("--max-steps") + 1] = "2"
            return Run(args, phrase, check=lambda: _assert_absent(case / "PWNED"))

        return build

    def malicious(ckpt: Path, case: Path) -> None:
        torch.save({"step": _Payload(str(case / "PWNED")), "counters": {}, "rng": {}}, ckpt / "state.pt")

    cases: dict[str, Callable[[Env, Path], Run]] = {
        **{f"deleted-{a}": damaged(a, "deleted") for a in (*ALM_ARRAYS, *TOPK_ARRAYS, "text", "token_ids")},
        **{f"flipped-{a}": damaged(a, "flipped") for a in ALM_ARRAYS},
        "flipped-topk_logprobs-uld": damaged("topk_logprobs", "flipped", "--losses", "alm+uld"),
        "truncated-token_logprob": damaged("token_logprob", "truncated"),
        "malicious-state-pt": resume(malicious, "cannot be loaded safely"),
        "truncated-trainable-pt": resume(lambda c, _: _truncate(c / "trainable.pt"), "cannot be loaded safely"),
        "checkpoint-config-not-json": resume(lambda c, _: _truncate(c / "config.json"), "config.json"),
        "foreign-out-overwrite": lambda env, case: Run(
            _train_args(env, env.store, _user_folder(case), "--overwrite"), "did not write", never=_SUGGESTS
        ),
        "foreign-out-resume": lambda env, case: Run(
            _train_args(env, env.store, _user_folder(case), "--resume"), "did not write", never=_SUGGESTS
        ),
        "out-is-a-file": lambda env, case: Run(_train_args(env, env.store, _write(case / "f", b"x")), "is a file"),
        "not-an-integer": lambda env, case: Run(
            [*_train_args(env, env.store, case / "run"), "--max-steps", "two"], "'--max-steps'"
        ),
        "full-disk-checkpoint": lambda env, case: Run(
            _train_args(env, env.store, case / "run"), "No space left on device", may_write=case / "run",
            patch=lambda mp: mp.setattr(torch, "save", _no_space), never=(".tmp-",),
        ),
        "unfinished-store": lambda env, case: Run(
            _train_args(env, _unfinish(_store(env, case)), case / "run"), "is unfinished"
        ),
        "missing-store": lambda env, case: Run(_train_args(env, case / "nope", case / "run"), "does not exist"),
    }
    if _ON_LINUX:
        cases["read-only-out"] = lambda env, case: Run(
            _train_args(env, env.store, _READ_ONLY / "run"), "cannot write"
        )
    return cases


def _align_cases() -> dict[str, Callable[[Env, Path], Run]]:
    def text_args(path: Path) -> list[str]:
        return ["align", "--teacher-tokenizer", "bytes", "--student-tokenizer", "bytes", "--text", str(path)]

    return {
        **{f"cache-{k}": v for k, v in _store_cases("align").items()},
        "input-lone-surrogate": lambda env, case: Run(
            text_args(_write(case / "t.jsonl", b'{"text": "x \\udc00"}\n')), "lone surrogate"
        ),
        "input-invalid-utf8": lambda env, case: Run(text_args(_write(case / "t.jsonl", b'{"text": "\xff"}\n')), "byte"),
        "input-missing": lambda env, case: Run(text_args(case / "nope.jsonl"), "does not exist"),
        "cache-s3-without-s3fs": lambda env, case: Run(
            ["align", "--cache", "s3://bucket/store", "--student-tokenizer", "bytes"], "pip install 'xtd[s3]'",
            patch=_without_s3fs,
        ),
    }


def _eval_cases() -> dict[str, Callable[[Env, Path], Run]]:
    def args(env: Env, *extra: str) -> list[str]:
        return ["eval", "--model", str(env.teacher), *extra]

    return {
        "text-lone-surrogate": lambda env, case: Run(
            args(env, "--text", str(_write(case / "t.jsonl", b'{"text": "a\\ud83d"}\n'))), "lone surrogate"
        ),
        "text-invalid-utf8": lambda env, case: Run(args(env, "--text", str(_write(case / "t.txt", b"ok \xc3("))), "UTF-8"),
        "text-empty": lambda env, case: Run(args(env, "--text", str(_write(case / "t.txt", b""))), "is empty"),
        "task-missing-fields": lambda env, case: Run(
            args(env, "--task", str(_write(case / "q.jsonl", b'{"prompt": "2+2="}\n'))), "'answer'"
        ),
        "task-lone-surrogate": lambda env, case: Run(
            args(env, "--task", str(_write(case / "q.jsonl", b'{"prompt": "\\udfff", "answer": "4"}\n'))),
            "lone surrogate",
        ),
        "model-missing": lambda env, case: Run(["eval", "--model", str(case / "nope"), "--held-out", "1"], "nope"),
        "not-an-integer": lambda env, case: Run(args(env, "--max-length", "two"), "'--max-length'"),
    }


CASES: dict[str, Callable[[Env, Path], Run]] = {
    **{f"precompute-{k}": v for k, v in _precompute_cases().items()},
    **{f"inspect-{k}": v for k, v in _store_cases("inspect").items()},
    **{f"verify-{k}": v for k, v in _store_cases("verify").items()},
    **{f"train-{k}": v for k, v in _train_cases().items()},
    **{f"align-{k}": v for k, v in _align_cases().items()},
    **{f"eval-{k}": v for k, v in _eval_cases().items()},
}


# ----------------------------------------------------------------------------- the test


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_fault(case_id: str, env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = tmp_path / "case"
    case.mkdir()
    run = CASES[case_id](env, case)
    watched = [case, env.store, env.run]
    before = {root: _snapshot(root) for root in watched}
    if run.patch is not None:
        run.patch(monkeypatch)
    result = runner.invoke(app, run.args)
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output and "most recent call last" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert run.phrase in " ".join(output.split()), output
    assert not [p for p in run.never if p in output], output
    for root in watched:
        after = _snapshot(root)
        changed = sorted(p for p in before[root] if after.get(p) != before[root][p])
        assert not changed, f"user files changed or deleted: {changed}"
        allowed = run.may_write
        new = sorted(p for p in set(after) - set(before[root]) if allowed is None or not p.is_relative_to(allowed))
        assert not new, f"files written outside the output path: {new}"
    if run.check is not None:
        run.check()


# ----------------------------------------------------------------------------- helpers


class _Payload:
    """Pickles to ``os.system("touch <marker>")``: what a crafted checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _without_s3fs(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without the s3 extra: ``import s3fs`` fails and fsspec has not cached it."""
    import sys

    from fsspec.registry import _registry

    monkeypatch.setitem(sys.modules, "s3fs", None)
    for proto in ("s3", "s3a"):
        if proto in _registry:
            monkeypatch.delitem(_registry, proto)


def _assert_absent(path: Path) -> None:
    assert not path.exists(), "the crafted checkpoint ran code"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncate(path: Path) -> Path:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


def _truncated_root(store: Path) -> Path:
    _truncate(store / "zarr.json")
    return store


def _unfinish(store: Path) -> Path:
    _edit_json(store / "part-00000" / "zarr.json", lambda m: m["attributes"]["xtd_part"].update(complete=False))
    return store


def _snapshot(root: Path) -> dict[Path, str]:
    if not root.exists():
        return {}
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}
