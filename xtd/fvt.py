"""Embeddings of a causal LM for a new tokenizer: FVT (spec/ALM.md §7.1), tie and untie.

:func:`fvt_matrix` maps every new token to old ids by the rules of :data:`FVT_RULES`
(special-token roles, identical byte views, the old tokenizer's split of the new token's
bytes, else a random draw) as one sparse matrix; :func:`fvt_init` applies it to the
input and output embeddings (and an output bias) with one sparse product.

Dimension letters: ``V`` vocabulary (``V_old``/``V_new``), ``H`` hidden size.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from xtd.errors import TokenizerError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from xtd.tokenization import ByteTokenizer

logger = logging.getLogger(__name__)

__all__ = ["FVT_RULES", "fvt_init", "fvt_matrix", "is_tied", "embedding_params", "untie_embeddings", "set_special_ids"]

FVT_RULES = ("special", "exact", "decomposed", "random")
"""The rules of spec/ALM.md §7.1 in the order they are tried; keys of ``init_report``."""

_ROLES = ("bos", "eos", "pad", "unk")  # bos wins over pad (spec/ALM.md §7.1 rule 1)


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


def fvt_matrix(
    old_tok: ByteTokenizer, new_tok: ByteTokenizer
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The FVT map from old to new ids (spec/ALM.md §7.1) as one sparse matrix.

    Rule per new token, in order: (1) ``special``: a token that plays a role (bos, eos,
    pad, unk; bos wins over pad) copies the old token of that role, and a special token
    whose string is an old special token copies it; (2) ``exact``: an identical byte view
    in the old vocabulary is copied (a non-byte-fallback id preferred); (3)
    ``decomposed``: the byte view is tokenized by the old tokenizer (its full pipeline;
    bytes that are not valid UTF-8 map to the old single-byte token) and the pieces'
    embeddings are averaged; (4) ``random``: otherwise.

    Returns:
        ``(matrix, is_random, counts)``: ``matrix`` a coalesced sparse COO float32 tensor
        (V_new, V_old) whose rows average old rows (all-zero for rule 4); ``is_random``
        (V_new,) bool; ``counts`` per rule.
    """
    old_roles, new_roles = _role_ids(old_tok), _role_ids(new_tok)
    old_special = {s: i for i, s in _special_strings(old_tok).items()}
    new_special = _special_strings(new_tok)
    old_unk = old_roles["unk"]

    # Byte view → old id, preferring ordinary tokens over <0xNN> byte-fallback pieces.
    old_by_bytes: dict[bytes, int] = {}
    old_specials = set(old_tok.special_ids.tolist())
    for i, view in enumerate(old_tok.token_bytes):
        if not view or i in old_specials:
            continue
        if view not in old_by_bytes or _is_byte_fallback(old_tok, old_by_bytes[view]):
            old_by_bytes[view] = i

    role_of_new: dict[int, str] = {}
    for role in reversed(_ROLES):  # earlier roles overwrite later ones: bos wins over pad
        idx = new_roles[role]
        if idx is not None and old_roles[role] is not None:
            role_of_new[int(idx)] = role

    rows: list[list[int]] = [[] for _ in range(new_tok.vocab_size)]
    counts = dict.fromkeys(FVT_RULES, 0)
    to_decompose: list[int] = []
    for j in range(new_tok.vocab_size):
        if j in role_of_new:
            rows[j] = [int(old_roles[role_of_new[j]])]  # type: ignore[arg-type]
            counts["special"] += 1
        elif j in new_special and new_special[j] in old_special:
            rows[j] = [old_special[new_special[j]]]
            counts["special"] += 1
        elif (view := new_tok.token_bytes[j]) and view in old_by_bytes:
            rows[j] = [old_by_bytes[view]]
            counts["exact"] += 1
        elif view:
            to_decompose.append(j)

    # Rule 3: one batched call of the old tokenizer over every valid-UTF-8 segment.
    segments = {j: _utf8_segments(new_tok.token_bytes[j]) for j in to_decompose}
    texts = sorted({s for segs in segments.values() for s in segs if isinstance(s, str)})
    encoded = dict(zip(texts, _encode_plain(old_tok, texts), strict=True)) if texts else {}
    for j in to_decompose:
        pieces: list[int] = []
        for seg in segments[j]:
            if isinstance(seg, str) and (ids := encoded[seg]) is not None:
                pieces.extend(ids)
            elif isinstance(seg, int) and (one := old_by_bytes.get(bytes([seg]))) is not None:
                pieces.append(one)
            else:
                pieces = []
                break
        if pieces and (old_unk is None or old_unk not in pieces):
            rows[j] = pieces
            counts["decomposed"] += 1
    counts["random"] = new_tok.vocab_size - sum(counts[r] for r in FVT_RULES[:3])

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


def _is_byte_fallback(tok: ByteTokenizer, idx: int) -> bool:
    hf = getattr(tok, "hf", None)
    if hf is None:
        return False
    piece = hf.convert_ids_to_tokens(int(idx))
    return isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _encode_plain(tok: ByteTokenizer, texts: list[str]) -> list[list[int] | None]:
    """Old-tokenizer ids of each text with no special tokens added (its whole pipeline).

    Special-token strings inside a text stay text (spec/ALM.md §2.3). A text whose byte
    views the tokenizer cannot reproduce gives ``None`` (FVT then falls back to rule 4).
    """
    from xtd.errors import ByteIdentityError

    try:
        return [enc.ids.tolist() for enc in tok.encode_batch(texts)]
    except ByteIdentityError:
        out: list[list[int] | None] = []
        for text in texts:
            try:
                out.append(tok.encode(text).ids.tolist())
            except ByteIdentityError:
                out.append(None)
        return out


def fvt_init(
    model: PreTrainedModel,
    old_tok: ByteTokenizer,
    new_tok: ByteTokenizer,
    *,
    untie: bool = False,
    seed: int = 0,
) -> dict[str, int]:
    """Move ``model`` in place from ``old_tok`` to ``new_tok`` (spec/ALM.md §7.1).

    Input and output embeddings (one matrix when tied; both when untied or ``untie``)
    and an output bias, if any, are initialised by the same rule: they are stacked as
    columns of one (V_old, n·H) matrix and multiplied once by the sparse FVT matrix of
    :func:`fvt_matrix`. Rule-4 rows are drawn from a normal with the old per-column mean
    and std. ``config.vocab_size`` and the bos/eos/pad ids follow the new tokenizer.

    Returns:
        Counts per rule (keys of :data:`FVT_RULES`).

    Raises:
        TokenizerError: ``old_tok`` has more ids than the model has embedding rows.
    """
    emb_in = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if old_tok.vocab_size > emb_in.weight.shape[0]:
        raise TokenizerError(
            f"old tokenizer {old_tok.name!r} has {old_tok.vocab_size} ids but the model has "
            f"{emb_in.weight.shape[0]} embedding rows; pass the model's own tokenizer"
        )
    tied = head is not None and head.weight is emb_in.weight
    dtype = emb_in.weight.dtype
    hidden = emb_in.weight.shape[1]
    v_old = old_tok.vocab_size
    blocks = [emb_in.weight.detach()[:v_old].float()]
    if head is not None and not tied:
        blocks.append(head.weight.detach()[:v_old].float())
    elif head is not None and untie:
        blocks.append(emb_in.weight.detach()[:v_old].float())
    bias = getattr(head, "bias", None) if head is not None else None
    if bias is not None:
        blocks.append(bias.detach()[:v_old, None].float())
    old = torch.cat(blocks, dim=1)  # (V_old, n·H [+1])

    matrix, is_random, counts = fvt_matrix(old_tok, new_tok)
    new = torch.sparse.mm(matrix, old)  # (V_new, n·H [+1]) dense: one sparse matmul for every rule
    if bool(is_random.any()):
        gen = torch.Generator().manual_seed(seed)
        mean, std = old.mean(0), old.std(0, unbiased=False)
        draws = torch.randn(int(is_random.sum()), old.shape[1], generator=gen) * std + mean
        new[is_random] = draws

    v_new = new_tok.vocab_size
    if untie and tied:
        untie_embeddings(model)
        tied = False
        head = model.get_output_embeddings()
    model.resize_token_embeddings(v_new, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new[:, :hidden].to(dtype))
        col = hidden
        out = model.get_output_embeddings()
        if out is not None and not tied:
            out.weight.copy_(new[:, col : col + hidden].to(dtype))
            col += hidden
        if out is not None and getattr(out, "bias", None) is not None:
            out.bias.copy_(new[:, col].to(out.bias.dtype))
    model.config.vocab_size = v_new
    set_special_ids(model, new_tok)
    logger.info("FVT init over %d new tokens: %s", v_new, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def set_special_ids(model: PreTrainedModel, tok: ByteTokenizer) -> None:
    """Point config and generation config at the new tokenizer's special ids."""
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    for key, value in ids.items():
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)
