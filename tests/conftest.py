"""Shared fixtures: an adversarial corpus, two BPE tokenizers trained in-process, and a
tiny random Llama saved as a Hugging Face folder. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads make
# small torch ops many times slower. Results are unchanged (it only affects waiting).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ADVERSARIAL = [
    "Hello world!",
    "  leading spaces and trailing   ",
    "tabs\tand\ttabs\t\tand newlines\n\n\nand \r\n windows line ends\r\n",
    "Emoji: 👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🏳️‍🌈 flag.",
    "Combining: e\u0301 a\u0308 n\u0303 — precomposed: é ä ñ",
    "CJK: 你好，世界。日本語のテキスト。한국어 텍스트.",
    "Arabic: مرحبا بالعالم. Hebrew: שלום עולם.",
    "digits 1234567890123456789012345678901234567890 and 3.14159",
    "def f(x):\n    if x:\n        return [i for i in range(x)]\n\treturn None\n",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "",
    "a",
    " ",
    "\n",
]


def _training_text() -> list[str]:
    from xtd.assets import iter_embedded_corpus

    texts = []
    for i, record in enumerate(iter_embedded_corpus()):
        texts.append(record["text"])
        if i >= 60:
            break
    return texts + ADVERSARIAL * 20


def _train_bpe(vocab_size: int, path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """Adversarial texts: non-ASCII, emoji with ZWJ, whitespace runs, code, empty."""
    return list(ADVERSARIAL)


@pytest.fixture(scope="session")
def tok_a_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tokenizer.json`` of a byte-level BPE with 400 entries (specials ``<|endoftext|>``, ``<|pad|>``)."""
    return _train_bpe(400, tmp_path_factory.mktemp("tok_a") / "tokenizer.json")


@pytest.fixture(scope="session")
def tok_b_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tokenizer.json`` of a second byte-level BPE, 700 entries, trained on the same text."""
    return _train_bpe(700, tmp_path_factory.mktemp("tok_b") / "tokenizer.json")


def _hf_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )


@pytest.fixture(scope="session")
def tok_a(tok_a_path: Path):
    """tok_a as a transformers ``PreTrainedTokenizerFast``."""
    return _hf_tokenizer(tok_a_path)


@pytest.fixture(scope="session")
def tok_b(tok_b_path: Path):
    """tok_b as a transformers ``PreTrainedTokenizerFast``."""
    return _hf_tokenizer(tok_b_path)


def make_tiny_llama(tokenizer, folder: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random Llama (hidden 32, 2 layers) with ``tokenizer`` as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tok_a, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a random 2-layer Llama (hidden 32) with tok_a: loads with Auto* classes."""
    return make_tiny_llama(tok_a, tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_lm_b(tok_b, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a random 2-layer Llama (hidden 32) with tok_b."""
    return make_tiny_llama(tok_b, tmp_path_factory.mktemp("tiny_lm_b"), seed=1)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    """Count the fault-injection cases (tests/test_faults.py) per command, and how they ended."""
    import collections

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if "test_faults.py::test_fault[" not in nodeid:
                continue
            command = nodeid.split("[", 1)[1].split("-", 1)[0]
            counts[command][outcome] += 1
    if not counts:
        return
    total = sum(sum(c.values()) for c in counts.values())
    per_command = ", ".join(f"{cmd} {sum(c.values())}" for cmd, c in sorted(counts.items()))
    ended = collections.Counter()
    for c in counts.values():
        ended.update(c)
    terminalreporter.write_sep("-", "fault injection")
    terminalreporter.write_line(f"{total} cases: {per_command}")
    terminalreporter.write_line(
        ", ".join(f"{n} {outcome}" for outcome, n in sorted(ended.items()))
        + " (each passed case: exit 1, one error line, no traceback, no user file changed)"
    )
