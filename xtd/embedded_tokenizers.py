"""Tokenizers that xtd builds itself, from files that install offline with packages.

* ``bytes``: ids 0..255 are the bytes in order, then special tokens (docs/method.md, "Byte students");
* ``embedded:gpt2`` (GPT-2 vocab and merges), ``embedded:llama3`` / ``embedded:qwen3``
  (byte-level BPE recovered from quicktok's tiktoken ranks), ``embedded:mistral-v1``
  (the SentencePiece model as a byte-fallback BPE), ``embedded:smollm2`` (the packaged
  teacher's own tokenizer).

Built tokenizers are cached as tokenizer.json under the xtd cache folder. Use them
through :func:`xtd.tokenization.load_tokenizer`.
"""

from __future__ import annotations

import functools
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from xtd import assets
from xtd.assets import cache_dir, quicktok_paths
from xtd.errors import TokenizerError

__all__ = ["EMBEDDED_TOKENIZERS", "bytes_to_unicode", "bytes_hf", "embedded_hf", "wrap_backend"]

EMBEDDED_TOKENIZERS: tuple[str, ...] = ("gpt2", "llama3", "qwen3", "mistral-v1", "smollm2")
"""Names accepted by ``load_tokenizer("embedded:<name>")``."""

# Split regexes of the published tokenizers (their tokenizer.json pre_tokenizer Split).
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte → printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def wrap_backend(backend: Any, **special: str | None) -> Any:
    """A ``tokenizers.Tokenizer`` as a transformers fast tokenizer with these special-token roles."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {k: v for k, v in special.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def bytes_hf(specials_of: Any | None = None) -> Any:
    """The built-in byte tokenizer: ids 0..255 = bytes, then specials (docs/method.md, "Byte students", "Deviations from the reference implementation").

    Args:
        specials_of: a :class:`~xtd.tokenization.ByteTokenizer` whose special tokens (and
            bos/eos/pad roles) to append, or None for ``<|endoftext|>`` and ``<|pad|>``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if specials_of is None:
        names = ["<|endoftext|>", "<|pad|>"]
        roles: dict[str, str | None] = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    else:
        other = specials_of
        inverse = {v: k for k, v in other.hf.get_vocab().items()}
        names = [inverse[int(i)] for i in other.special_ids]
        roles = {
            "bos_token": None if other.bos_id is None else inverse[other.bos_id],
            "eos_token": None if other.eos_id is None else inverse[other.eos_id],
            "pad_token": None if other.pad_id is None else inverse[other.pad_id],
        }
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    return wrap_backend(backend, **roles)


def embedded_hf(name: str) -> Any:
    """The transformers tokenizer of ``embedded:<name>``, built from packaged files."""

    if name == "smollm2":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(assets.embedded_teacher_dir()))
    if name == "gpt2":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab_path, merges_path = assets.gpt2_vocab_merges_paths()
        backend = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<|endoftext|>"])
        return wrap_backend(backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    if name in ("llama3", "qwen3"):
        return _quicktok_hf(name)
    if name == "mistral-v1":
        return _sentencepiece_hf(assets.mistral_sentencepiece_path("v1"), expected_size=32000)
    raise TokenizerError(f"unknown embedded tokenizer {name!r}; known: {', '.join(EMBEDDED_TOKENIZERS)}")


def _cached_json(key: str, build: Any) -> Any:
    """Build a tokenizers.Tokenizer once and keep its JSON under the xtd cache dir."""
    from tokenizers import Tokenizer


    path = cache_dir() / "tokenizers" / f"{key}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    backend = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    backend.save(tmp)
    os.replace(tmp, path)  # appears whole or not at all
    return backend


def _read_quicktok(name: str) -> tuple[dict[bytes, int], dict[str, int]]:

    vocab_path, special_path = quicktok_paths(name)
    data = vocab_path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    ranks: dict[bytes, int] = {}
    pos = 4
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, pos)
        token = data[pos + 2 : pos + 2 + length]
        (rank,) = struct.unpack_from("<I", data, pos + 2 + length)
        ranks[token] = rank
        pos += 6 + length
    data = special_path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    specials: dict[str, int] = {}
    pos = 4
    for _ in range(count):
        ident, length = struct.unpack_from("<IH", data, pos)
        specials[data[pos + 6 : pos + 6 + length].decode("utf-8")] = ident
        pos += 6 + length
    return ranks, specials


def _bpe_from_ranks(ranks: dict[bytes, int], pattern: str) -> Any:
    """A byte-level BPE equivalent to tiktoken ranks (merges recovered from the ranks)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    model = models.BPE(
        vocab={to_str(t): r for t, r in ranks.items()},
        merges=[(to_str(m[3]), to_str(m[4])) for m in merges],
        fuse_unk=False,
        ignore_merges=True,  # tiktoken looks up whole pieces first
    )
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _quicktok_hf(name: str) -> Any:
    from tokenizers import AddedToken, processors

    def build() -> Any:
        ranks, specials = _read_quicktok(name)
        backend = _bpe_from_ranks(ranks, _LLAMA3_PATTERN if name == "llama3" else _QWEN_PATTERN)
        # Specials at their published ids: the ids follow the ranks without gaps.
        for content, ident in sorted(specials.items(), key=lambda kv: kv[1]):
            got = backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            if got != 1 or backend.token_to_id(content) != ident:
                raise TokenizerError(f"embedded:{name}: special token {content!r} did not land at id {ident}")
        if name == "llama3":  # the published Llama-3 tokenizer prepends <|begin_of_text|>
            bos = "<|begin_of_text|>"
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, specials[bos])]
            )
        # Qwen's published tokenizer also has an NFC normaliser; it is left out on purpose,
        # since docs/method.md, "Byte view of a tokenizer" would refuse it (NFC rewrites bytes of non-NFC text).
        return backend

    backend = _cached_json(f"quicktok-{name}-v2", build)
    if name == "llama3":
        return wrap_backend(backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    return wrap_backend(backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _sentencepiece_hf(model_path: Path, *, expected_size: int) -> Any:
    """A SentencePiece BPE model with byte fallback as a tokenizers BPE (Llama-2 style)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    def build() -> Any:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        size = sp.get_piece_size()
        if size != expected_size:
            raise TokenizerError(f"{str(model_path)!r} has {size} pieces, expected {expected_size}")
        pieces = [sp.id_to_piece(i) for i in range(size)]
        vocab = {p: i for i, p in enumerate(pieces)}
        merges: list[tuple[int, int, int, str, str]] = []
        for i, piece in enumerate(pieces):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    merges.append((i, vocab[left], vocab[right], left, right))
        merges.sort()
        unk = pieces[sp.unk_id()]
        backend = Tokenizer(
            models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True)
        )
        # SentencePiece's dummy prefix (docs/method.md, "Chunks"): prepend ▁, spaces become ▁.
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        controls = [pieces[i] for i in range(size) if sp.is_control(i) or sp.is_unknown(i)]
        backend.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in controls])
        bos = pieces[sp.bos_id()]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
        )
        return backend

    backend = _cached_json(f"sentencepiece-{model_path.name}-v1", build)
    return wrap_backend(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
