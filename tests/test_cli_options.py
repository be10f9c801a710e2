"""The options of every config-driven verb are generated from its config class: one flag per
leaf, with the leaf's help and default, plus ``--config FILE`` and ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer.main
from rich.markup import escape
from typer.testing import CliRunner

from xtd.cli import app
from xtd.config import (
    AlignConfig,
    ConfigBase,
    EvalConfig,
    HypernetApplyConfig,
    PrecomputeConfig,
    TrainConfig,
    flag,
)
from xtd.errors import ConfigError

runner = CliRunner()

VERBS = [
    (("train",), TrainConfig),
    (("precompute",), PrecomputeConfig),
    (("eval",), EvalConfig),
    (("align",), AlignConfig),
    (("hypernet", "apply"), HypernetApplyConfig),
]


def _command(path: tuple[str, ...]):  # noqa: ANN202 - a click command
    command = typer.main.get_command(app)
    for word in path:
        command = command.commands[word]  # type: ignore[attr-defined]
    return command


@pytest.mark.parametrize(("path", "config_cls"), VERBS, ids=[" ".join(p) for p, _ in VERBS])
def test_every_leaf_is_one_option_with_the_configs_help_and_default(path: tuple[str, ...], config_cls: type[ConfigBase]) -> None:
    command = _command(path)
    options = {opt: param for param in command.params for opt in param.opts}
    for leaf in config_cls.leaves():
        param = options[flag(leaf.key)]
        assert param.help.startswith(escape(leaf.help)), leaf.key  # the help lives in the config only
        assert param.default is None, leaf.key  # "not typed": the config's own default applies
        if leaf.short:
            assert leaf.short in param.opts
        if not leaf.required and leaf.default not in (None, "", ()) and not isinstance(leaf.default, bool):
            shown = (leaf.sep or " ").join(leaf.default) if isinstance(leaf.default, tuple) else str(leaf.default)
            assert f"[default: {shown}]" in param.help.replace("\\[", "["), leaf.key
    generated = {flag(leaf.key) for leaf in config_cls.leaves()}
    own = {opt for param in command.params for opt in param.opts if opt.startswith("--")} - generated
    own -= {f"--no-{flag(leaf.key)[2:]}" for leaf in config_cls.leaves()}
    assert own <= {"--config", "--json", "--help", "--quiet", "--verbose"}, own
    assert "--config" in own and "--json" in own


def test_config_file_then_flags(tmp_path: Path) -> None:
    saved = TrainConfig(store=("a.zarr",), out="runs/a", lr=3e-4, tau=5.0, batch_size=8).to_dict()
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(saved))
    assert TrainConfig.from_file(path) == TrainConfig.from_dict(saved)
    (tmp_path / "hand.yaml").write_text("store: [a.zarr]\nout: runs/b\nalm:\n  tau: 7.5\nbatch-size: 4\n")
    config = TrainConfig.from_file(tmp_path / "hand.yaml")
    assert (config.alm.tau, config.data.batch_size, config.store) == (7.5, 4, ("a.zarr",))
    (tmp_path / "bad.yaml").write_text("store: [a.zarr]\nout: o\nbogus: 1\ntau: -1\n")
    with pytest.raises(ConfigError, match="bogus"):
        TrainConfig.from_file(tmp_path / "bad.yaml")
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 1 and "bogus" in result.output and "Traceback" not in result.output


def test_flat_and_nested_construction_agree() -> None:
    flat = TrainConfig(store=("s",), out="o", lr=1e-3, tau=5.0, alm_chunks="space", batch_size=8)
    nested = TrainConfig.from_dict({"store": ["s"], "out": "o", "optim": {"lr": 1e-3},
                                    "alm": {"tau": 5.0, "chunks": "space"}, "data": {"batch_size": 8}})  # fmt: skip
    assert flat == nested and flat.tau == flat.alm.tau == 5.0 and flat.alm_chunks == "space"
    assert TrainConfig.from_dict(flat.flat_dict()) == flat == TrainConfig.from_dict(flat.to_dict())
    with pytest.raises(TypeError, match="bogus"):
        TrainConfig(store=("s",), out="o", bogus=1)


def test_precompute_and_eval_read_a_config_file_and_precompute_resumes_from_its_store(
    tiny_lm: Path, tmp_path: Path
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("first text here", "a second, longer text")))
    store = tmp_path / "store"
    (tmp_path / "pre.yaml").write_text(f"teacher: {tiny_lm}\ndata: {data}\ntop-k: 2\nmax_length: 64\nstride: 16\n")
    first = runner.invoke(app, ["precompute", "--config", str(tmp_path / "pre.yaml"), "--out", str(store), "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout.splitlines()[-1])["complete"]
    from xtd.storage import open_store

    assert open_store(store).top_k == 2  # the file's value, not the default
    # --resume --out STORE: the store's own settings, nothing else typed; a finished store has nothing to do
    again = runner.invoke(app, ["precompute", "--resume", "--out", str(store), "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["complete"] and summary["documents_written"] == 0 and summary["documents_resumed"] == 2
    # eval: settings from JSON, a flag typed on the command line overrides the file
    text = tmp_path / "t.txt"
    text.write_text("Hello there, a short text to score. " * 4)
    (tmp_path / "eval.json").write_text(json.dumps({"model": [str(tiny_lm)], "text": str(text), "max_length": 9999}))
    from_file = runner.invoke(app, ["eval", "--config", str(tmp_path / "eval.json"), "--json"])
    assert from_file.exit_code == 0, from_file.output
    assert json.loads(from_file.stdout.splitlines()[-1])["config"]["max_length"] == 9999
    typed = runner.invoke(app, ["eval", "--config", str(tmp_path / "eval.json"), "--max-length", "32", "--stride", "8", "--json"])
    assert typed.exit_code == 0, typed.output
    summary = json.loads(typed.stdout.splitlines()[-1])
    (row,) = summary["results"]
    assert summary["config"]["max_length"] == 32
    assert row["model"] == str(tiny_lm) and row["num_bytes"] == len(text.read_bytes())


@pytest.mark.parametrize(
    "verb", [["precompute"], ["train"], ["eval"], ["align"], ["inspect"], ["verify"], ["hypernet", "apply"]]
)
def test_help_shows_metavars_and_examples_not_python_types(verb: list[str]) -> None:
    import re

    result = runner.invoke(app, [*verb, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert not re.search(r"<(str|bool|int|float|list|path)\b[^>]*>", result.output), result.output
    assert "Examples" in result.output and f"xtd {' '.join(verb)}" in result.output.split("Examples")[-1]
