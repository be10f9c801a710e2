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
