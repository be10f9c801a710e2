"""Embeddings of a causal LM for a new tokenizer: FVT (docs/method.md, "FVT initialisation"), tie and untie.

:func:`fvt_matrix` maps every new token to old ids by the rules of :data:`FVT_RULES`
(special-token roles, identical byte views, the old tokenizer's split of the new token's
bytes, else a random draw) as one sparse matrix; :func:`fvt_init` applies it to the
input and output embeddings (and an output bias) with one sparse product.
:func:`fvt_pieces` gives the same rules' ordered old-token pieces per new token (the
hypernetwork's input, :mod:`xtd.hypernet`); :func:`embedding_table` and
:func:`set_embedding_table` read and write every embedding of a model as one matrix.

Dimension letters: ``V`` vocabulary (``V_old``/``V_new``), ``H`` hidden size.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from xtd.errors import ByteIdentityError, TokenizerError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from xtd.tokenization import ByteTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "FVT_RULES",
    "EmbeddingLayout",
    "fvt_init",
    "fvt_matrix",
    "fvt_pieces",
    "embedding_table",
    "set_embedding_table",
    "is_tied",
    "embedding_params",
    "untie_embeddings",
    "set_special_ids",
]

FVT_RULES = ("special", "exact", "decomposed", "random")
"""The rules of docs/method.md, "FVT initialisation" in the order they are tried; keys of ``init_report``."""

_ROLES = ("bos", "eos", "pad", "unk")  # bos wins over pad (docs/method.md, "FVT initialisation")


def is_tied(model: nn.Module) -> bool:
    """Whether the output layer shares the input embedding matrix."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def embedding_params(model: nn.Module) -> list[nn.Parameter]:
    """The input embedding matrix and, when untied, the output matrix."""
    params = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not params[0]:
        params.append(out.weight)
    return params


def untie_embeddings(model: PreTrainedModel) -> None:
    """Give a tied model its own output matrix, a copy of the input one."""
    if not is_tied(model):
        return
    weight = model.get_input_embeddings().weight
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(head)


def _role_ids(tok: ByteTokenizer) -> dict[str, int | None]:
    unk = getattr(tok.hf, "unk_token_id", None) if getattr(tok, "hf", None) is not None else None
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": unk}


def _special_strings(tok: ByteTokenizer) -> dict[int, str]:
    hf = getattr(tok, "hf", None)
    if hf is None:
        return {}
    out = {}
    for i in tok.special_ids.tolist():
        piece = hf.convert_ids_to_tokens(int(i))
        if isinstance(piece, str):
            out[int(i)] = piece
    return out


def _utf8_segments(data: bytes) -> list[str | int]:
    """Split bytes into valid UTF-8 runs (str) and the single bytes (int) between them."""
    out: list[str | int] = []
    pos = 0
    while pos < len(data):
        try:
            out.append(data[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as exc:
            if exc.start:
                out.append(data[pos : pos + exc.start].decode("utf-8"))
            out.extend(data[pos + exc.start : pos + exc.end])
            pos += exc.end
    return out


def fvt_pieces(
    old_tok: ByteTokenizer, new_tok: ByteTokenizer, ids: Sequence[int] | None = None
) -> tuple[list[list[int]], list[str]]:
    """The old-token pieces of new tokens by the FVT rules (docs/method.md, "FVT initialisation").

    Rule per new token, in order: (1) ``special``: a token that plays a role (bos, eos,
    pad, unk; bos wins over pad) maps to the old token of that role, and a special token
    whose string is an old special token maps to it; (2) ``exact``: an identical byte view
    in the old vocabulary (a non-byte-fallback id preferred); (3) ``decomposed``: the byte
    view as the old tokenizer cuts it (its full pipeline; bytes that are not valid UTF-8
    map to the old single-byte token); (4) ``random``: no pieces.

    Args:
        old_tok: the tokenizer whose ids the pieces are.
        new_tok: the tokenizer whose tokens are decomposed.
        ids: new ids to decompose, in this order; ``None`` for every id.

    Returns:
        ``(pieces, rules)``: per requested id its old ids in text order (one id for rules
        1–2, ``[]`` for rule 4; a piece may repeat) and the name of the rule that applied.
    """
    wanted = range(new_tok.vocab_size) if ids is None else [int(j) for j in ids]
    old_roles, new_roles = _role_ids(old_tok), _role_ids(new_tok)
    old_special = {s: i for i, s in _special_strings(old_tok).items()}
    new_special = _special_strings(new_tok)
    old_unk = old_roles["unk"]
    old_by_bytes = _bytes_index(old_tok)

    role_of_new: dict[int, str] = {}
    for role in reversed(_ROLES):  # earlier roles overwrite later ones: bos wins over pad
        idx = new_roles[role]
        if idx is not None and old_roles[role] is not None:
            role_of_new[int(idx)] = role

    pieces: list[list[int]] = []
    rules: list[str] = []
    to_decompose: list[int] = []  # positions in `pieces`
    for j in wanted:
        if j in role_of_new:
            pieces.append([int(old_roles[role_of_new[j]])])  # type: ignore[arg-type]
            rules.append("special")
        elif j in new_special and new_special[j] in old_special:
            pieces.append([old_special[new_special[j]]])
            rules.append("special")
        elif (view := new_tok.token_bytes[j]) and view in old_by_bytes:
            pieces.append([old_by_bytes[view]])
            rules.append("exact")
        else:
            pieces.append([])
            rules.append("random")
            if view:
                to_decompose.append(len(pieces) - 1)

    # Rule 3: one batched call of the old tokenizer over every valid-UTF-8 segment.
    wanted_ids = list(wanted)
    segments = {k: _utf8_segments(new_tok.token_bytes[wanted_ids[k]]) for k in to_decompose}
    texts = sorted({s for segs in segments.values() for s in segs if isinstance(s, str)})
    encoded = dict(zip(texts, _encode_plain(old_tok, texts), strict=True)) if texts else {}
    for k in to_decompose:
        row: list[int] = []
        for seg in segments[k]:
            if isinstance(seg, str) and (found := encoded[seg]) is not None:
                row.extend(found)
            elif isinstance(seg, int) and (one := old_by_bytes.get(bytes([seg]))) is not None:
                row.append(one)
            else:
                row = []
                break
        if row and (old_unk is None or old_unk not in row):
            pieces[k] = row
            rules[k] = "decomposed"
    return pieces, rules


def fvt_matrix(
    old_tok: ByteTokenizer, new_tok: ByteTokenizer
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The FVT map from old to new ids as one sparse matrix (docs/method.md, "FVT initialisation").

    Each new token's row averages the old rows of its :func:`fvt_pieces` (the rules are
    documented there); a token without pieces (rule 4) has an all-zero row.

    Returns:
        ``(matrix, is_random, counts)``: ``matrix`` a coalesced sparse COO float32 tensor
        (V_new, V_old) whose rows average old rows (all-zero for rule 4); ``is_random``
        (V_new,) bool; ``counts`` per rule.
    """
    rows, rules = fvt_pieces(old_tok, new_tok)
    counts = {rule: rules.count(rule) for rule in FVT_RULES}

    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    row_idx = torch.repeat_interleave(torch.arange(new_tok.vocab_size), lengths)
    col_idx = torch.tensor([i for r in rows for i in r], dtype=torch.int64)
    val = torch.repeat_interleave(1.0 / lengths.clamp(min=1).float(), lengths)
    # COO sums repeated pieces on coalesce (a piece twice in a decomposition weighs 2/n).
    matrix = torch.sparse_coo_tensor(
        torch.stack([row_idx, col_idx]),
        val,
        size=(new_tok.vocab_size, old_tok.vocab_size),
        check_invariants=True,  # indices in range; also opts out of torch's per-call warning
    ).coalesce()
    return matrix, lengths == 0, counts


@functools.lru_cache(maxsize=8)
def _bytes_index(tok: ByteTokenizer) -> dict[bytes, int]:
    """Byte view → id of ``tok``'s ordinary tokens, preferring them over ``<0xNN>`` pieces.

    Cached per tokenizer object: the hypernetwork decomposes tokens every training step.
    """
    index: dict[bytes, int] = {}
    specials = set(tok.special_ids.tolist())
    for i, view in enumerate(tok.token_bytes):
        if not view or i in specials:
            continue
        if view not in index or _is_byte_fallback(tok, index[view]):
            index[view] = i
    return index


def _is_byte_fallback(tok: ByteTokenizer, idx: int) -> bool:
    hf = getattr(tok, "hf", None)
    if hf is None:
        return False
    piece = hf.convert_ids_to_tokens(int(idx))
    return isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _encode_plain(tok: ByteTokenizer, texts: list[str]) -> list[list[int] | None]:
    """Old-tokenizer ids of each text with no special tokens added (its whole pipeline).

    Special-token strings inside a text stay text (docs/method.md, "Byte view of a tokenizer"). A text whose byte
    views the tokenizer cannot reproduce gives ``None`` (FVT then falls back to rule 4);
    such texts are found by halving the batch, so a few of them cost a few more batched
    calls, not one call per text.
    """

    try:
        return [enc.ids.tolist() for enc in tok.encode_batch(texts)]
    except ByteIdentityError:
        if len(texts) == 1:
            return [None]
        half = len(texts) // 2
        return _encode_plain(tok, texts[:half]) + _encode_plain(tok, texts[half:])


@dataclass(frozen=True)
class EmbeddingLayout:
    """How :func:`embedding_table` lays a model's embeddings side by side in one matrix.

    Columns ``[0, H)`` hold the input embedding; ``[H, 2H)`` the output embedding when
    ``separate_output``; the last column the output bias when ``output_bias``.
    """

    hidden_size: int
    separate_output: bool
    output_bias: bool

    @property
    def width(self) -> int:
        """Number of columns: ``H``, ``2H``, plus one for a bias."""
        return self.hidden_size * (2 if self.separate_output else 1) + int(self.output_bias)


def embedding_table(
    model: PreTrainedModel, rows: int | None = None, *, untie: bool = False
) -> tuple[torch.Tensor, EmbeddingLayout]:
    """Every embedding of ``model`` as one float32 matrix (a copy).

    Args:
        model: a causal LM.
        rows: keep the first ``rows`` vocabulary rows (a tokenizer's size; models may
            pad their matrices); ``None`` for all.
        untie: lay a tied model out as untied (its input matrix twice), for
            :func:`set_embedding_table` to untie it.

    Returns:
        ``(table, layout)``: ``table`` (V, layout.width) float32.
    """
    emb_in = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb_in.weight
    rows = emb_in.weight.shape[0] if rows is None else rows
    separate = head is not None and (not tied or untie)
    bias = getattr(head, "bias", None) if head is not None else None
    blocks = [emb_in.weight.detach()[:rows].float()]
    if separate:
        blocks.append(head.weight.detach()[:rows].float())
    if bias is not None:
        blocks.append(bias.detach()[:rows, None].float())
    layout = EmbeddingLayout(hidden_size=emb_in.weight.shape[1], separate_output=separate, output_bias=bias is not None)
    return torch.cat(blocks, dim=1), layout


def set_embedding_table(
    model: PreTrainedModel, table: torch.Tensor, layout: EmbeddingLayout, tok: ByteTokenizer
) -> None:
    """Give ``model`` the embeddings of ``table`` for the tokenizer ``tok``, in place.

    The model is resized to ``table``'s rows (and untied first when ``layout`` has a
    separate output matrix but the model is tied); ``config.vocab_size`` and the
    bos/eos/pad ids follow ``tok``.

    Args:
        model: a causal LM.
        table: (V, layout.width) rows laid out as :func:`embedding_table` does.
        layout: the column layout of ``table``.
        tok: the tokenizer the rows belong to (``V == tok.vocab_size``).
    """
    hidden = layout.hidden_size
    dtype = model.get_input_embeddings().weight.dtype
    if layout.separate_output and is_tied(model):
        untie_embeddings(model)
    model.resize_token_embeddings(table.shape[0], mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(table[:, :hidden].to(dtype))
        col = hidden
        out = model.get_output_embeddings()
        if out is not None and layout.separate_output:
            out.weight.copy_(table[:, col : col + hidden].to(dtype))
            col += hidden
        if out is not None and layout.output_bias and getattr(out, "bias", None) is not None:
            out.bias.copy_(table[:, col].to(out.bias.dtype))
    model.config.vocab_size = table.shape[0]
    set_special_ids(model, tok)


def fvt_init(
    model: PreTrainedModel,
    old_tok: ByteTokenizer,
    new_tok: ByteTokenizer,
    *,
    untie: bool = False,
    seed: int = 0,
) -> dict[str, int]:
    """Move ``model`` in place from ``old_tok`` to ``new_tok`` (docs/method.md, "FVT initialisation").

    Input and output embeddings (one matrix when tied; both when untied or ``untie``)
    and an output bias, if any, are initialised by the same rule: they are stacked as
    columns of one (V_old, n·H) matrix (:func:`embedding_table`) and multiplied once by
    the sparse FVT matrix of :func:`fvt_matrix`. Rule-4 rows are drawn from a normal with
    the old per-column mean and std. ``config.vocab_size`` and the bos/eos/pad ids follow
    the new tokenizer.

    Returns:
        Counts per rule (keys of :data:`FVT_RULES`).

    Raises:
        TokenizerError: ``old_tok`` has more ids than the model has embedding rows.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if old_tok.vocab_size > rows:
        raise TokenizerError(
            f"old tokenizer {old_tok.name!r} has {old_tok.vocab_size} ids but the model has "
            f"{rows} embedding rows; pass the model's own tokenizer"
        )
    old, layout = embedding_table(model, old_tok.vocab_size, untie=untie)  # (V_old, n·H [+1])

    matrix, is_random, counts = fvt_matrix(old_tok, new_tok)
    new = torch.sparse.mm(matrix, old)  # (V_new, n·H [+1]) dense: one sparse matmul for every rule
    if bool(is_random.any()):
        gen = torch.Generator().manual_seed(seed)
        mean, std = old.mean(0), old.std(0, unbiased=False)
        draws = torch.randn(int(is_random.sum()), old.shape[1], generator=gen) * std + mean
        new[is_random] = draws

    set_embedding_table(model, new, layout, new_tok)
    logger.info("FVT init over %d new tokens: %s", new_tok.vocab_size, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def set_special_ids(model: PreTrainedModel, tok: ByteTokenizer) -> None:
    """Point config and generation config at the new tokenizer's special ids."""
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    for key, value in ids.items():
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)
