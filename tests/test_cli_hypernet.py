"""``xtd hypernet apply``: zero-shot transfer writes a folder that transformers loads (the
base tokenizer through a new hypernetwork gives the base model back, logit for logit);
bad input gives one error line before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xtd.cli import app
from xtd.config import HypernetConfig
from xtd.hypernet.model import build_hypernet, save_hypernet

runner = CliRunner()


@pytest.fixture(scope="module")
def hypernets(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hypernets")
    identity = build_hypernet(tiny_lm, HypernetConfig(num_heads=4, num_layers=1))
    trained = build_hypernet(tiny_lm, HypernetConfig(num_heads=4, num_layers=1), seed=2)
    with torch.no_grad():  # as if trained: the output projection is no longer zero
        trained.hypernet.out_proj.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    return {"identity": save_hypernet(identity, root / "identity"), "trained": save_hypernet(trained, root / "trained")}


def _error(result, phrase: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[0].startswith("error:"), result.output
    assert phrase in " ".join(result.output.split()), result.output


def test_help_ends_with_examples() -> None:
    result = runner.invoke(app, ["hypernet", "apply", "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and "xtd hypernet apply --hypernet" in result.output
    assert runner.invoke(app, ["hypernet", "--help"]).exit_code == 0


def test_base_tokenizer_through_a_new_hypernetwork_is_the_base_model(hypernets, tiny_lm, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "same"
    result = runner.invoke(
        app, ["hypernet", "apply", "--hypernet", str(hypernets["identity"]), "--tokenizer", str(tiny_lm), "--out", str(out),
              "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["counts"]["truncated"] == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("To be, or not to be: that is the question.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    sidecar = json.loads((out / "xtd_student.json").read_text())
    assert sidecar["card"]["hypernet"] == str(hypernets["identity"])
    assert "by the hypernetwork" in (out / "README.md").read_text()


@pytest.mark.parametrize("target", ["other", "bytes"])
def test_transfer_to_another_tokenizer_loads_and_generates(hypernets, tok_b_path: Path, tmp_path: Path, target) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xtd.hypernet.model import load_hypernet
    from xtd.tokenization import load_tokenizer

    spec = str(tok_b_path) if target == "other" else "bytes"
    out = tmp_path / target
    args = ["hypernet", "apply", "--hypernet", str(hypernets["trained"]), "--tokenizer", spec, "--out", str(out)]
    result = runner.invoke(app, [*args, "--batch-tokens", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(spec)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == tok.vocab_size == model.config.vocab_size
    want, _ = load_hypernet(hypernets["trained"]).predict(tok)
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), want, rtol=1e-5, atol=1e-6)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok("Hello world", return_tensors="pt").input_ids
    assert np.array_equal(ids[0].numpy(), tok.encode("Hello world").ids)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_id)
    assert generated.shape[1] == ids.shape[1] + 4


def test_bad_input_gives_one_error_line(hypernets, tiny_lm, tmp_path: Path) -> None:
    def apply(*extra: str, hypernet: Path = hypernets["identity"], out: Path = tmp_path / "out"):
        return runner.invoke(
            app, ["hypernet", "apply", "--hypernet", str(hypernet), "--tokenizer", str(tiny_lm), "--out", str(out), *extra]
        )

    _error(apply(hypernet=tmp_path / "nothing"), "no hypernetwork at")
    _error(runner.invoke(app, ["hypernet", "apply", "--hypernet", str(hypernets["identity"]), "--tokenizer",
                               str(tmp_path / "no-tokenizer"), "--out", str(tmp_path / "o")]), "no tokenizer at")  # fmt: skip
    _error(apply("--device", "tpu"), "--device")
    _error(apply("--batch-tokens", "0"), "--batch-tokens")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    _error(apply(out=tmp_path / "full"), "exists and is not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "keep"
    assert apply("--overwrite", out=tmp_path / "full").exit_code == 0
    assert not (tmp_path / "full" / "keep.txt").exists()
