"""Evaluate causal LMs fairly across tokenizers: bits per byte, ensembles, exact match.

**Bits per byte** is the total negative log-likelihood of a text in nats, divided by
ln 2 and by the number of UTF-8 bytes scored. Unlike per-token perplexity it does not
depend on how many tokens a tokenizer cuts the text into, so a model moved to another
tokenizer compares with its original (nanochat's ``loss_eval.evaluate_bpb`` idea).

Conventions, the same for every model:

* **BOS.** Each text is encoded without special tokens, and the tokenizer's BOS (its EOS
  when it has no BOS) is prepended, so the first text token is scored too and every byte
  of the text counts. A tokenizer with neither cannot score its first token: that token
  and its bytes are left out of both sums (``num_bytes`` then shows it).
* **Windows.** A sequence longer than ``max_length`` is scored in the windows of
  :func:`xtd.packing.plan_windows` (the teacher's in ``xtd precompute`` too): each later
  window carries ``stride`` tokens of context over from the previous one and scores only
  tokens no earlier window scored, so every token is scored exactly once, with at least
  ``stride`` tokens of context (all of it while the window still starts at the beginning).
  With ``max_length`` at least the longest sequence, a text is scored whole, in one
  forward pass.
* **Ensembles** (docs/method.md, "Ensembles"): models that share a tokenizer run on the same ids;
  per position ``p`` takes the log of the mean probability and ``logp`` the mean
  log-probability renormalised with a log-softmax.
* **Held-out text** (:func:`xtd.texts.held_out_texts`): the *last* N documents of
  :func:`xtd.assets.iter_embedded_corpus` (the end of the KJV). Precompute's default
  slice takes documents from the start of that corpus and never reaches them.
* **Exact match**: greedy generation after the prompt (BOS-prefixed the same way); the
  prediction is the generated text up to EOS — cut at its first line break when the
  reference answer is one line — and matches when it equals the answer, both stripped
  of surrounding whitespace. A task line with an ``answer_format`` (``final-number``:
  ``#### 42`` as in the maths problems of :mod:`xtd.maths` and GSM8K; ``boxed``:
  ``\\boxed{42}``) is scored on its final answer instead (:func:`xtd.maths.is_correct`),
  and its generation also stops once the answer line is complete.

Dimension letters: ``B`` windows in a batch, ``L`` window length, ``V`` vocabulary,
``M`` ensemble members, ``N`` scored positions of one window.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xtd.errors import ConfigError, DataError, TokenizerMismatchError
from xtd.packing import pack_longest_first, plan_windows
from xtd.runtime import resolve_device, resolve_dtype, torch_dtype
from xtd.sampling import teacher_samples
from xtd.student import load_causal_lm, model_tokenizer
from xtd.texts import held_out_texts, read_tasks, read_texts
from xtd.tokenization import load_tokenizer

if TYPE_CHECKING:
    from xtd.config import EvalConfig
    from xtd.tokenization import ByteTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "TaskResult",
    "EvalRow",
    "Progress",
    "bits_per_byte",
    "ensemble_bits_per_byte",
    "exact_match",
    "check_model_tokenizer",
    "check_shared_tokenizer",
    "score_windows",
    "tokenizer_label",
    "evaluate",
]

Progress = Callable[[str, int, int], None]
"""``progress(description, advance, total)``: called with 0 first, then per batch."""

COMBINE_RULES = ("p", "logp")


@dataclass(frozen=True)
class EvalResult:
    """Likelihood of some texts under one model (or ensemble).

    Attributes:
        model: the name shown in tables.
        tokenizer: the tokenizer's name.
        num_texts: texts scored.
        num_bytes: UTF-8 bytes covered by the scored tokens.
        num_tokens: tokens scored.
        nll_nats: total negative log-likelihood of the scored tokens, natural log.
    """

    model: str
    tokenizer: str
    num_texts: int
    num_bytes: int
    num_tokens: int
    nll_nats: float

    @property
    def bits_per_byte(self) -> float:
        """Total NLL in bits over the scored bytes (NaN when nothing was scored)."""
        return self.nll_nats / math.log(2) / self.num_bytes if self.num_bytes else math.nan

    @property
    def token_perplexity(self) -> float:
        """exp(mean NLL per token); depends on the tokenizer, unlike bits per byte."""
        return math.exp(self.nll_nats / self.num_tokens) if self.num_tokens else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain values, the derived metrics included."""
        return {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "num_texts": self.num_texts,
            "num_bytes": self.num_bytes,
            "num_tokens": self.num_tokens,
            "nll_nats": self.nll_nats,
            "bits_per_byte": self.bits_per_byte,
            "token_perplexity": self.token_perplexity,
        }


@dataclass(frozen=True)
class TaskResult:
    """Exact-match accuracy of greedy generation on prompt/answer pairs."""

    model: str
    num_examples: int
    num_correct: int
    predictions: tuple[str, ...]

    @property
    def accuracy(self) -> float:
        """Fraction of exact matches (NaN for no examples)."""
        return self.num_correct / self.num_examples if self.num_examples else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain values, the predictions included."""
        return {
            "model": self.model,
            "num_examples": self.num_examples,
            "num_correct": self.num_correct,
            "exact_match": self.accuracy,
            "predictions": list(self.predictions),
        }


@dataclass(frozen=True)
class EvalRow:
    """One row of ``xtd eval``: a model (or ensemble) with its metrics."""

    model: str
    tokenizer: str
    likelihood: EvalResult | None
    task: TaskResult | None
    benchmarks: dict[str, dict[str, float]] | None = None  # lm-eval --tasks: {task: {metric: value}}

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict (what ``xtd eval --json`` prints per row)."""
        out: dict[str, Any] = {"model": self.model, "tokenizer": self.tokenizer}
        if self.likelihood is not None:
            out.update({k: v for k, v in self.likelihood.to_dict().items() if k not in out})
        if self.task is not None:
            out.update(
                exact_match=self.task.accuracy,
                task_examples=self.task.num_examples,
                task_correct=self.task.num_correct,
            )
        if self.benchmarks is not None:
            out["tasks"] = self.benchmarks
        return out


# --------------------------------------------------------------------------- inputs


# --------------------------------------------------------------------------- checks


def _embedding_rows(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def check_model_tokenizer(model: torch.nn.Module, tokenizer: ByteTokenizer, *, model_name: str) -> None:
    """Refuse a tokenizer with more ids than the model has embedding rows.

    Raises:
        TokenizerMismatchError: naming both and what to pass instead.
    """
    rows = _embedding_rows(model)
    if tokenizer.vocab_size > rows:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but model {model_name!r} "
            f"has only {rows} embedding rows: they do not belong together; pass the model's own "
            "tokenizer with --tokenizer (or drop --tokenizer to use the one saved with the model)"
        )


def check_shared_tokenizer(members: Sequence[tuple[str, ByteTokenizer]]) -> None:
    """Ensemble members must share one tokenizer (identical digests, docs/method.md, "Ensembles").

    Raises:
        TokenizerMismatchError: listing each member's tokenizer and digest.
    """
    digests = {tok.digest for _, tok in members}
    if len(digests) > 1:
        listing = ", ".join(f"{name!r}: {tok.name} ({tok.digest})" for name, tok in members)
        raise TokenizerMismatchError(
            f"ensemble members do not share a tokenizer ({listing}); ensemble only models moved "
            "to the same tokenizer, or force one with --tokenizer"
        )


# --------------------------------------------------------------------------- scoring


def _prefix_id(tokenizer: ByteTokenizer) -> int | None:
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


@dataclass(frozen=True)
class _Prepared:
    seqs: list[np.ndarray]  # per text: (n,) int64 ids, the BOS prefix included
    num_bytes: int
    num_tokens: int


def _prepare(tokenizer: ByteTokenizer, texts: Sequence[str]) -> _Prepared:
    """Encode texts with the BOS convention; count the bytes of the tokens to be scored."""
    prefix = _prefix_id(tokenizer)
    seqs, num_bytes, num_tokens = [], 0, 0
    for enc in tokenizer.encode_batch(list(texts)):
        ids = enc.ids.astype(np.int64)
        widths = (enc.spans[:, 1] - enc.spans[:, 0]).astype(np.int64)
        if prefix is not None:
            ids = np.concatenate([[prefix], ids])
        else:
            widths = widths[1:]  # the first token has no context and is not scored
        seqs.append(ids)
        num_bytes += int(widths.sum())
        num_tokens += max(len(ids) - 1, 0)
    return _Prepared(seqs=seqs, num_bytes=num_bytes, num_tokens=num_tokens)


def _windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first)`` over a sequence; targets ``[first, end)`` are scored.

    :func:`xtd.packing.plan_windows` with ``stride`` tokens of context; positions
    1..length-1 are targets (position 0 has no context), each scored once.
    """
    windows = [(begin, end, max(first, 1)) for begin, end, first in plan_windows(length, max_length, stride)]
    return [w for w in windows if w[2] < w[1]]


def score_windows(
    models: Sequence[torch.nn.Module],
    seqs: Sequence[np.ndarray],
    *,
    max_length: int,
    stride: int,
    batch_size: int,
    combine: Sequence[str] = ("single",),
    on_batch: Callable[[int], None] | None = None,
    on_tokens: Callable[[str, int, int, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, tuple[float, int]]:
    """Total NLL (nats) and number of scored tokens of ``seqs`` under one model or an ensemble.

    Args:
        models: one model, or the ensemble members (same vocabulary ids).
        seqs: per text an (n,) int id array; positions 1..n-1 are scored.
        max_length, stride: the window scheme (module docstring).
        batch_size: windows per forward pass (right-padded).
        combine: ``"single"`` for one model; any of ``"p"``, ``"logp"`` for ensembles.
        on_batch: called with the number of tokens scored after each batch.
        on_tokens: ``on_tokens(rule, text, first, logprob (N,), greedy (N,) bool)`` per window:
            the log-prob of each scored target ``first … first+N-1`` of text ``text`` and
            whether it is the argmax (xtd.lm_eval_model scores continuations with it).

    Returns:
        ``{rule: (nll_nats, num_tokens)}`` per entry of ``combine``.
    """
    if max_length < 2:
        raise ConfigError(f"--max-length ({max_length}) must be at least 2")
    if not 1 <= stride < max_length:
        raise ConfigError(f"--stride ({stride}) must be at least 1 and smaller than --max-length ({max_length})")
    if batch_size < 1:
        raise ConfigError(f"--batch-size ({batch_size}) must be at least 1")
    unknown = [rule for rule in combine if rule not in ("single", *COMBINE_RULES)]
    if unknown or not combine:
        raise ConfigError(f"unknown --combine rule(s) {unknown}; use {', '.join(COMBINE_RULES)}")
    jobs = [(t, w) for t, seq in enumerate(seqs) for w in _windows(len(seq), max_length, stride)]
    device = next(models[0].parameters()).device
    totals = {rule: 0.0 for rule in combine}
    count = 0
    for group in pack_longest_first([end - begin for _, (begin, end, _) in jobs], max_items=batch_size):
        batch = [jobs[j] for j in group]
        width = max(end - begin for _, (begin, end, _) in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (t, (begin, end, _)) in enumerate(batch):
            ids[row, : end - begin] = torch.from_numpy(seqs[t][begin:end])
            mask[row, : end - begin] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = [m(input_ids=ids, attention_mask=mask).logits for m in models]  # M × (B, L, V)
            vocab = min(x.shape[-1] for x in logits)
            for row, (t, (begin, end, first)) in enumerate(batch):
                # Logits at window position q predict the token at q + 1.
                rows = slice(first - begin - 1, end - begin - 1)
                target = ids[row, first - begin : end - begin]  # (N,)
                member_logp = torch.stack(
                    [x[row, rows, :vocab].float().log_softmax(-1) for x in logits]
                )  # (M, N, V)
                for rule in combine:
                    if rule == "single":
                        logp = member_logp[0]
                    elif rule == "p":
                        logp = member_logp.logsumexp(0) - math.log(len(models))
                    else:  # "logp"
                        logp = member_logp.mean(0).log_softmax(-1)
                    token_logp = logp.gather(-1, target[:, None])[:, 0]  # (N,)
                    totals[rule] -= float(token_logp.sum())
                    if on_tokens is not None:
                        on_tokens(rule, t, first, token_logp, logp.argmax(-1) == target)
                count += end - first
        del logits
        if on_batch is not None:
            on_batch(sum(end - first for _, (_, end, first) in batch))
    return {rule: (totals[rule], count) for rule in combine}


def _effective_window(model: torch.nn.Module, max_length: int, stride: int) -> tuple[int, int]:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and 2 <= limit < max_length:
        logger.warning("--max-length %d exceeds the model's %d positions; using %d", max_length, limit, limit)
        return limit, min(stride, limit - 1)
    return max_length, stride


def bits_per_byte(
    model: torch.nn.Module,
    tokenizer: ByteTokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 1024,
    stride: int = 512,
    batch_size: int = 1,
    name: str | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Bits per byte and token perplexity of ``texts`` under ``model`` (module docstring).

    Raises:
        TokenizerMismatchError: the tokenizer has more ids than the model's embeddings.
        DataError: there is no text to score.
        ConfigError: a bad window setting.
    """
    name = name or str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)
    check_model_tokenizer(model, tokenizer, model_name=name)
    prepared = _prepare(tokenizer, texts)
    if prepared.num_tokens == 0:
        raise DataError("no text to score: every text is empty (or a single token without a BOS)")
    max_length, stride = _effective_window(model, max_length, stride)
    was_training = model.training
    model.eval()
    tick = _ticker(progress, f"scoring {name}", prepared.num_tokens)
    try:
        scores = score_windows(
            [model], prepared.seqs, max_length=max_length, stride=stride, batch_size=batch_size, on_batch=tick
        )
    finally:
        model.train(was_training)
    nll, count = scores["single"]
    assert count == prepared.num_tokens, (count, prepared.num_tokens)
    return EvalResult(name, tokenizer.name, len(texts), prepared.num_bytes, count, nll)


def ensemble_bits_per_byte(
    models: Sequence[torch.nn.Module],
    tokenizer: ByteTokenizer,
    texts: Sequence[str],
    *,
    combine: Sequence[str] = COMBINE_RULES,
    max_length: int = 1024,
    stride: int = 512,
    batch_size: int = 1,
    name: str = "ensemble",
    progress: Progress | None = None,
) -> list[EvalResult]:
    """Bits per byte of an ensemble of models that share ``tokenizer`` (docs/method.md, "Ensembles").

    One result per rule in ``combine`` (``p``: log of the mean probability; ``logp``:
    renormalised mean log-probability), all from one pass over the members.

    Raises:
        ConfigError: fewer than two members or an unknown rule.
        TokenizerMismatchError, DataError: as :func:`bits_per_byte`.
    """
    if len(models) < 2:
        raise ConfigError(f"an ensemble needs at least two models, got {len(models)}")
    bad = [c for c in combine if c not in COMBINE_RULES]
    if bad or not combine:
        raise ConfigError(f"--combine {','.join(combine)!r}: choose from {', '.join(COMBINE_RULES)}")
    for i, model in enumerate(models):
        check_model_tokenizer(model, tokenizer, model_name=f"{name} member {i + 1}")
    prepared = _prepare(tokenizer, texts)
    if prepared.num_tokens == 0:
        raise DataError("no text to score: every text is empty (or a single token without a BOS)")
    for model in models:
        max_length, stride = _effective_window(model, max_length, stride)
        model.eval()
    tick = _ticker(progress, f"scoring {name}", prepared.num_tokens)
    scores = score_windows(
        list(models), prepared.seqs, max_length=max_length, stride=stride, batch_size=batch_size,
        combine=tuple(combine), on_batch=tick,
    )
    return [
        EvalResult(f"{name} ({rule})", tokenizer.name, len(texts), prepared.num_bytes, scores[rule][1], scores[rule][0])
        for rule in combine
    ]


def _ticker(progress: Progress | None, description: str, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    progress(description, 0, total)
    return lambda n: progress(description, n, total)


# --------------------------------------------------------------------------- exact match


def _prediction(generated: str, answer: str) -> str:
    text = generated.strip()
    if "\n" not in answer.strip():
        text = text.split("\n", 1)[0].strip()
    return text


def exact_match(
    model: torch.nn.Module,
    tokenizer: ByteTokenizer,
    tasks: Sequence[dict[str, str]],
    *,
    max_new_tokens: int = 32,
    name: str | None = None,
    progress: Progress | None = None,
) -> TaskResult:
    """Exact-match accuracy of greedy generation (the module docstring's convention).

    Raises:
        ConfigError: ``max_new_tokens < 1``.
        TokenizerMismatchError: the tokenizer has more ids than the model's embeddings.
    """
    from transformers import GenerationConfig

    from xtd import maths

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens ({max_new_tokens}) must be at least 1")
    name = name or type(model).__name__
    check_model_tokenizer(model, tokenizer, model_name=name)
    prefix = _prefix_id(tokenizer)
    stop = tokenizer.eos_id
    pad = next(i for i in (tokenizer.pad_id, stop, 0) if i is not None)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad, bos_token_id=prefix
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tick = _ticker(progress, f"generating {name}", len(tasks))
    predictions, correct = [], 0
    try:
        for task in tasks:
            ids = tokenizer.encode(task["prompt"]).ids.astype(np.int64)
            if prefix is not None:
                ids = np.concatenate([[prefix], ids])
            if len(ids) == 0:
                raise DataError("a task prompt is empty and the tokenizer has no BOS: nothing to generate from")
            inputs = torch.from_numpy(ids)[None].to(device)  # (1, n)
            answer_format = task.get("answer_format")
            stop = [maths.AnswerStop(tokenizer, inputs.shape[1], answer_format)] if answer_format else None
            with torch.inference_mode():
                out = model.generate(
                    input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config,
                    stopping_criteria=stop,
                )
            generated = tokenizer.hf.decode(out[0, inputs.shape[1] :].tolist(), skip_special_tokens=True)
            if answer_format:
                prediction = maths.extract_answer(generated, answer_format) or ""
                correct += maths.is_correct(generated, task["answer"], answer_format)
            else:
                prediction = _prediction(generated, task["answer"])
                correct += prediction == task["answer"].strip()
            predictions.append(prediction)
            if tick is not None:
                tick(1)
    finally:
        model.train(was_training)
    return TaskResult(name, len(tasks), correct, tuple(predictions))


# --------------------------------------------------------------------------- driver


def _load(spec: str, tokenizer_spec: str | None, config: EvalConfig) -> tuple[Any, ByteTokenizer]:

    device = resolve_device(config.device)
    model = load_causal_lm(spec, dtype=torch_dtype(resolve_dtype(config.dtype, device)))
    if tokenizer_spec is None:
        tokenizer = model_tokenizer(spec)
    else:
        tokenizer = load_tokenizer(tokenizer_spec)
    check_model_tokenizer(model, tokenizer, model_name=spec)
    return model.to(device), tokenizer


def tokenizer_label(tokenizer: ByteTokenizer) -> str:
    """A short table label: the spec (a path shortened to its folder name) and the id count."""
    name = tokenizer.name
    path = Path(name)
    if path.exists():
        name = (path.parent if path.is_file() else path).name or name
    return f"{name} ({tokenizer.vocab_size:,})"


def evaluate(config: EvalConfig, *, progress: Progress | None = None) -> list[EvalRow]:
    """Run ``xtd eval``: one row per ``--model`` and per ensemble rule.

    Models are loaded one at a time (ensemble members together) and released after
    their row. Inputs are read and checked before any model is loaded.

    Raises:
        DataError, ConfigError, ModelLoadError, TokenizerError: bad input, one line each.
    """
    tasks = read_tasks(config.task) if config.task is not None else None
    if config.tasks:  # lm-eval tasks (xtd.eval_tasks): checked before any model loads
        from xtd.eval_tasks import check_tasks
        from xtd.lm_eval_model import run_benchmarks

        check_tasks(config.tasks)
    texts: list[str] | None = None
    if config.sample_from is not None:  # the teacher's samples are the text (xtd.sampling)

        texts = [record["text"] for record in teacher_samples(config, progress=progress)]
    elif config.text is not None:
        texts = read_texts(config.text)
    elif config.held_out_documents() is not None:
        texts = held_out_texts(config.held_out_documents())  # type: ignore[arg-type]

    rows: list[EvalRow] = []
    for i, spec in enumerate(config.model):
        tok_spec = config.tokenizer_for(i)
        model, tokenizer = _load(spec, tok_spec, config)
        likelihood = task = None
        if texts is not None:
            likelihood = bits_per_byte(
                model, tokenizer, texts, max_length=config.max_length, stride=config.stride,
                batch_size=config.batch_size, name=spec, progress=progress,
            )
        if tasks is not None:
            task = exact_match(model, tokenizer, tasks, max_new_tokens=config.max_new_tokens, name=spec, progress=progress)
        benchmarks = run_benchmarks([model], tokenizer, config, name=spec) if config.tasks else None
        rows.append(EvalRow(spec, tokenizer_label(tokenizer), likelihood, task, benchmarks))
        del model
        gc.collect()

    for group in config.ensemble:
        specs = [s.strip() for s in group.split(",") if s.strip()]
        forced = config.tokenizer[0] if len(config.tokenizer) == 1 else None
        members = [_load(spec, forced, config) for spec in specs]
        check_shared_tokenizer([(spec, tok) for spec, (_, tok) in zip(specs, members, strict=True)])
        tokenizer = members[0][1]
        if texts is None and not config.tasks:
            logger.warning("ensemble %s: exact match is not computed for ensembles; pass --text or --held-out", group)
            continue
        results = ensemble_bits_per_byte(
            [m for m, _ in members], tokenizer, texts, combine=config.combine, max_length=config.max_length,
            stride=config.stride, batch_size=config.batch_size, name="+".join(specs), progress=progress,
        ) if texts is not None else [None] * len(config.combine)  # fmt: skip
        for rule, r in zip(config.combine, results, strict=True):
            name = f"{'+'.join(specs)} ({rule})"
            bench = run_benchmarks([m for m, _ in members], tokenizer, config, name=name, combine=rule) if config.tasks else None
            rows.append(EvalRow(name, tokenizer_label(tokenizer), r, None, bench))
        del members
        gc.collect()
    return rows
