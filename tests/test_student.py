"""xtd.student: FVT init against a naive per-token reference, tying, fresh models, LoRA
targets found structurally, and saving a folder that transformers loads and generates from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xtd.errors import ConfigError, ModelLoadError, TokenizerError
from xtd.fvt import FVT_RULES, _utf8_segments, fvt_init
from xtd.student import find_lora_targets, load_causal_lm, load_student, save_student
from xtd.tokenization import load_tokenizer


def _naive_fvt(old_tok, new_tok, old: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[str, int]]:
    """Slow, obvious docs/method.md, "FVT initialisation": one new token at a time, linear scans of the old vocab.

    Returns the expected row of every non-random new token and the per-rule counts.
    """
    def role(tok, name):
        return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": tok.hf.unk_token_id}[name]

    old_specials = set(old_tok.special_ids.tolist())
    old_special_str = {old_tok.hf.convert_ids_to_tokens(i): i for i in old_specials}
    rows: dict[int, torch.Tensor] = {}
    counts = dict.fromkeys(FVT_RULES, 0)
    for j in range(new_tok.vocab_size):
        source = None
        for name in ("bos", "eos", "pad", "unk"):
            if role(new_tok, name) == j and role(old_tok, name) is not None:
                source = [role(old_tok, name)]
                break
        if source is None and j in set(new_tok.special_ids.tolist()):
            string = new_tok.hf.convert_ids_to_tokens(j)
            if string in old_special_str:
                source = [old_special_str[string]]
        if source is not None:
            rows[j] = old[source[0]]
            counts["special"] += 1
            continue
        view = new_tok.token_bytes[j]
        match = [i for i in range(old_tok.vocab_size) if i not in old_specials and old_tok.token_bytes[i] == view]
        if view and match:
            rows[j] = old[match[0]]
            counts["exact"] += 1
            continue
        try:
            pieces = old_tok.encode(view.decode("utf-8")).ids.tolist() if view else []
        except UnicodeDecodeError:
            pieces = []
            for b in view:  # every byte alone, as the old single-byte token
                single = [i for i in range(old_tok.vocab_size) if old_tok.token_bytes[i] == bytes([b])]
                if not single:
                    pieces = []
                    break
                pieces.append(single[0])
        if pieces:
            rows[j] = torch.stack([old[i] for i in pieces]).mean(0)
            counts["decomposed"] += 1
        else:
            counts["random"] += 1
    return rows, counts


@pytest.fixture(scope="module")
def toks(tok_a_path: Path, tok_b_path: Path):
    return {"a": load_tokenizer(str(tok_a_path)), "b": load_tokenizer(str(tok_b_path)), "bytes": load_tokenizer("bytes")}


def _model(tok, *, tied: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pair", [("a", "b"), ("b", "a"), ("a", "bytes"), ("bytes", "b")])
@pytest.mark.parametrize("tied", [True, False])
def test_fvt_matches_naive_reference(toks, pair, tied: bool, seed: int):
    old_tok, new_tok = toks[pair[0]], toks[pair[1]]
    model = _model(old_tok, tied=tied, seed=seed)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    counts = fvt_init(model, old_tok, new_tok, seed=seed)

    want_in, want_counts = _naive_fvt(old_tok, new_tok, old_in)
    assert counts == want_counts
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    assert new_in.shape == (new_tok.vocab_size, old_in.shape[1])
    for j, row in want_in.items():
        torch.testing.assert_close(new_in[j], row, rtol=1e-5, atol=1e-6)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    if not tied:  # the output matrix is initialised by the same rule, from its own rows
        want_out, _ = _naive_fvt(old_tok, new_tok, old_out)
        for j, row in want_out.items():
            torch.testing.assert_close(new_out[j], row, rtol=1e-5, atol=1e-6)
    random_rows = [j for j in range(new_tok.vocab_size) if j not in want_in]
    if random_rows:  # rule 4: drawn around the old per-dimension statistics, not copies
        drawn = new_in[random_rows]
        assert torch.isfinite(drawn).all()
        assert drawn.abs().max() < old_in.abs().max() * 10
    assert model.config.vocab_size == new_tok.vocab_size
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        new_tok.bos_id, new_tok.eos_id, new_tok.pad_id,
    )
    ids = torch.tensor([new_tok.encode("Hello world, to be or not").ids.tolist()])
    assert model(input_ids=ids).logits.shape[-1] == new_tok.vocab_size


def test_fvt_byte_student_copies_every_byte(toks):
    # tok_a's alphabet holds all 256 single bytes, so a byte student copies them all.
    model = _model(toks["a"], tied=True, seed=0)
    counts = fvt_init(model, toks["a"], toks["bytes"])
    assert counts == {"special": 2, "exact": 256, "decomposed": 0, "random": 0}


def test_fvt_untie_gives_two_equal_matrices(toks):
    model = _model(toks["a"], tied=True, seed=0)
    fvt_init(model, toks["a"], toks["b"], untie=True, seed=3)
    emb_in, emb_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb_in is not emb_out and not model.config.tie_word_embeddings
    torch.testing.assert_close(emb_in, emb_out)  # same rule on the same (tied) source


@pytest.mark.parametrize("seed", range(20))
def test_utf8_segments_reassemble(seed: int):
    rng = np.random.default_rng(seed)
    pool = ["a", "é", "你", "👍", " ", "\n"]
    data = b""
    for _ in range(int(rng.integers(0, 8))):
        data += pool[int(rng.integers(len(pool)))].encode() if rng.random() < 0.6 else bytes([int(rng.integers(256))])
    segments = _utf8_segments(data)
    rebuilt = b"".join(s.encode() if isinstance(s, str) else bytes([s]) for s in segments)
    assert rebuilt == data
    assert all(s for s in segments if isinstance(s, str))
    for s in segments:
        if isinstance(s, int):
            with pytest.raises(UnicodeDecodeError):
                bytes([s]).decode()
    assert _utf8_segments(b"") == []


def test_load_student_own_tokenizer_is_unchanged(tiny_lm: Path):
    plain = load_causal_lm(tiny_lm)
    student = load_student(tiny_lm)
    assert not student.tokenizer_changed
    assert student.tokenizer.digest == student.original_tokenizer.digest
    ids = torch.tensor([student.tokenizer.encode("Hello world").ids.tolist()])
    torch.testing.assert_close(student.model(input_ids=ids).logits, plain(input_ids=ids).logits)
    same = load_student(tiny_lm, tokenizer=str(tiny_lm))
    assert not same.tokenizer_changed


def test_load_student_moves_to_new_tokenizer(tiny_lm: Path, tok_b_path: Path):
    student = load_student(tiny_lm, tokenizer=str(tok_b_path), seed=1)
    assert student.tokenizer_changed
    report = student.init_report
    assert sum(report[r] for r in FVT_RULES) == student.tokenizer.vocab_size == 700
    assert report["exact"] > 300 and report["tied"]
    assert student.model.get_input_embeddings().weight.shape[0] == 700


def test_fresh_model_from_config(tiny_lm: Path, tok_b_path: Path, tmp_path: Path):
    student = load_student(model_config=tiny_lm / "config.json", tokenizer=str(tok_b_path), seed=5)
    assert student.original_tokenizer is None and student.tokenizer_changed
    assert student.model.config.vocab_size == 700 and student.model.config.num_hidden_layers == 2
    again = load_student(model_config=tiny_lm, tokenizer=str(tok_b_path), seed=5)
    torch.testing.assert_close(
        student.model.get_input_embeddings().weight, again.model.get_input_embeddings().weight
    )
    # a folder with a tokenizer: that tokenizer by default
    own = load_student(model_config=tiny_lm)
    assert own.tokenizer.vocab_size == 400
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_lm / "config.json").read_text())
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        load_student(model_config=bare / "config.json")


def test_bad_student_arguments(tiny_lm: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="not both"):
        load_student(tiny_lm, model_config=tiny_lm)
    with pytest.raises(ConfigError, match="no student"):
        load_student()
    with pytest.raises(ConfigError, match="--lora-rank"):
        load_student(tiny_lm, lora_rank=-1)
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_student(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_student(tmp_path / "empty")
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((tiny_lm / name).read_bytes())
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_student(weights_only)
    with pytest.raises(ConfigError, match="embedded"):
        load_student("embedded:nope")


def _gpt2(vocab: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def test_lora_targets_are_found_structurally():
    llama = _model(load_tokenizer("bytes"), tied=True, seed=0)
    names = find_lora_targets(llama)
    leaves = sorted({n.rsplit(".", 1)[1] for n in names})
    assert leaves == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert all(n.startswith("model.layers.") for n in names)  # never lm_head or embeddings
    gpt2 = find_lora_targets(_gpt2())
    assert sorted({n.split(".", 3)[3] for n in gpt2}) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert len(gpt2) == 8

    class NoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="no LoRA targets"):
        find_lora_targets(NoBlocks())


def test_lora_on_gpt2_conv1d_merges_exactly():
    from xtd.student import _apply_lora, _merged_model

    torch.manual_seed(0)
    wrapped, targets = _apply_lora(_gpt2().eval(), rank=2, alpha=4.0, train_embeddings=False)
    assert len(targets) == 8
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    ids = torch.arange(10)[None]
    merged = _merged_model(wrapped)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(merged(input_ids=ids).logits, wrapped(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_trainable_parameters(tiny_lm: Path, tok_b_path: Path):
    moved = load_student(tiny_lm, tokenizer=str(tok_b_path), lora_rank=4)
    trainable = {n for n, p in moved.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert any("embed_tokens" in n for n in trainable)  # the tokenizer changed
    assert not any("q_proj.base_layer" in n for n in trainable)
    assert moved.init_report["lora_targets"] == 14
    kept = load_student(tiny_lm, lora_rank=4)
    assert not any("embed_tokens" in n for n, p in kept.model.named_parameters() if p.requires_grad)
    frozen = load_student(tiny_lm, tokenizer=str(tok_b_path), lora_rank=4, train_embeddings=False)
    assert not any("embed_tokens" in n for n, p in frozen.model.named_parameters() if p.requires_grad)


def test_save_student_merges_lora_and_loads_in_transformers(tiny_lm: Path, tok_b_path: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = load_student(tiny_lm, tokenizer=str(tok_b_path), lora_rank=4, untie=True)
    with torch.no_grad():  # make the adapters matter (lora_B starts at zero)
        for name, param in student.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = torch.tensor([student.tokenizer.encode("To be, or not to be").ids.tolist()])
    want = student.model(input_ids=ids).logits.detach()

    card = {"store": "runs/teacher-store", "lr": 1e-5, "losses": "alm+sft", "note": "a|b"}
    out = save_student(student, tmp_path / "student", card=card)
    assert hasattr(student.model, "peft_config")  # the live model keeps its adapters
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    assert tokenizer("To be, or not to be")["input_ids"] == ids[0].tolist()
    assert not model.config.tie_word_embeddings
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 3)
    assert isinstance(tokenizer.decode(generated[0]), str)

    readme = (out / "README.md").read_text()
    assert "runs/teacher-store" in readme
    for key in card:
        assert f"| {key} |" in readme
    sidecar = json.loads((out / "xtd_student.json").read_text())
    assert sidecar["card"] == card and sidecar["init_report"]["tokenizer_changed"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    with pytest.raises(ConfigError, match="not empty"):
        save_student(student, out, card=card)
    again = save_student(load_student(tiny_lm), out, card={"store": "other"}, overwrite=True)
    assert "other" in (again / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(again).config.vocab_size == 400


@pytest.mark.slow
def test_smollm2_to_gpt2_is_fast_and_saves(tmp_path: Path):
    """Must show: a 50k-token vocabulary initialises in seconds; the saved student loads."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    student = load_student("embedded:smollm2", tokenizer="embedded:gpt2")
    elapsed = time.perf_counter() - start
    report = student.init_report
    assert report["exact"] > 30000 and report["decomposed"] > 10000 and report["random"] < 100
    assert elapsed < 30, elapsed
    out = save_student(student, tmp_path / "s", card={"store": "none"})
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The Lord is my shepherd", return_tensors="pt")["input_ids"]
    out_ids = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out_ids.shape[1] == ids.shape[1] + 2
