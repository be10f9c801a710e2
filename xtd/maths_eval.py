"""Score causal LMs on maths word problems: greedy exact match and bits per byte of solutions.

**Prompt.** A model trained by xtd from a store of chat records learnt the *store
view* of each conversation: the teacher's chat-template rendering with the template's
special-token strings removed (they are special rows of the store, not text; see
:func:`xtd.maths.store_view`), after the student's own BOS. ``prompt="store"``
(the default) prompts every model that way: its BOS (its EOS when it has none), then
the store view of the user turn and the template's generation prompt, so teacher and
students read the same prompt bytes. ``prompt="template"`` renders the user turn with
the model's *own* chat template instead (special tokens as ids), for a model that was
trained with it and never by xtd (a published teacher, as in the GPU recipe).

**Generation.** Greedy decoding, prompts left-padded in batches; a row stops at its
EOS, when its answer line is complete (:func:`xtd.maths.answer_stop`: a line break
after ``####``, or after a closed ``\\boxed{}`` in the ``boxed`` format), or after
``max_new_tokens``. The final answer is read from the generated text by
:func:`xtd.maths.extract_answer` and scored by :func:`xtd.maths.is_correct`. Every
problem's output is kept for inspection.

**Bits per byte of solutions.** The negative log-likelihood of each reference
solution after its prompt, over the solution's UTF-8 bytes. In the store view prompt
and solution are encoded together, as in training, and every token that ends inside
the solution is scored (a token straddling the boundary counts with all its bytes);
with the template the solution's own tokens follow the template's ids.

Dimension letters: ``B`` prompts in a batch, ``L`` padded length, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from xtd.errors import ConfigError
from xtd.maths import (
    ANSWER_FORMAT,
    SYSTEM_PROMPT,
    Problem,
    answer_stop,
    check_steps,
    conversation,
    extract_answer,
    is_correct,
    prompt_view,
)

if TYPE_CHECKING:
    from xtd.tokenization import ByteTokenizer

__all__ = [
    "MathsOutput",
    "MathsScore",
    "PromptMode",
    "prompt_ids",
    "solution_inputs",
    "generate_solutions",
    "solution_bits_per_byte",
    "score_problems",
]

PromptMode = Literal["store", "template"]

Progress = Callable[[str, int, int], None]
"""``progress(description, advance, total)``: called with 0 first, then per batch."""


@dataclass(frozen=True)
class MathsOutput:
    """One problem's generation: what the model wrote and how it was scored."""

    id: str
    kind: str
    answer: str
    generated: str
    prediction: str | None
    correct: bool
    new_tokens: int
    steps_right: int
    steps: int

    def to_dict(self) -> dict[str, Any]:
        """Plain values (one line of the per-problem outputs file)."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class MathsScore:
    """Exact match and solution bits per byte of one model on a set of problems."""

    model: str
    outputs: tuple[MathsOutput, ...]
    solution_nll_nats: float
    solution_bytes: int

    @property
    def exact_match(self) -> float:
        """Fraction of problems whose final answer is right (NaN for none)."""
        return sum(o.correct for o in self.outputs) / len(self.outputs) if self.outputs else math.nan

    @property
    def bits_per_byte(self) -> float:
        """Bits per byte of the reference solutions given their prompts."""
        return self.solution_nll_nats / math.log(2) / self.solution_bytes if self.solution_bytes else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Summary values (the outputs are written separately)."""
        return {
            "model": self.model,
            "problems": len(self.outputs),
            "correct": sum(o.correct for o in self.outputs),
            "exact_match": self.exact_match,
            "answered": sum(o.prediction is not None for o in self.outputs),
            "steps": sum(o.steps for o in self.outputs),
            "step_accuracy": _ratio(sum(o.steps_right for o in self.outputs), sum(o.steps for o in self.outputs)),
            "solution_bits_per_byte": self.bits_per_byte,
            "solution_bytes": self.solution_bytes,
        }


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def _prefix_id(tokenizer: ByteTokenizer) -> int | None:
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def prompt_ids(
    tokenizer: ByteTokenizer,
    question: str,
    *,
    mode: PromptMode = "store",
    chat_tokenizer: ByteTokenizer | None = None,
    system: str | None = SYSTEM_PROMPT,
) -> np.ndarray:
    """(n,) int64 prompt ids of a question (module docstring).

    Args:
        tokenizer: the model's tokenizer.
        question: the problem text.
        mode: ``store`` or ``template``.
        chat_tokenizer: ``store`` only: the tokenizer whose chat template rendered the
            training records (:func:`xtd.maths.prompt_view`).
        system: the system prompt of the training records (None: none).

    Raises:
        ConfigError: ``template`` for a tokenizer without a chat template, or an unknown mode.
    """
    if mode == "template":
        if not getattr(tokenizer.hf, "chat_template", None):
            raise ConfigError(f"tokenizer {tokenizer.name!r} has no chat template; prompt it with mode 'store'")
        ids = tokenizer.hf.apply_chat_template(
            conversation(question, system=system), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return np.asarray(ids, dtype=np.int64)
    if mode != "store":
        raise ConfigError(f"unknown prompt mode {mode!r}; choose 'store' or 'template'")
    return _with_prefix(tokenizer, tokenizer.encode(prompt_view(question, chat_tokenizer, system=system)).ids)


def _with_prefix(tokenizer: ByteTokenizer, ids: np.ndarray) -> np.ndarray:
    prefix = _prefix_id(tokenizer)
    ids = np.asarray(ids, dtype=np.int64)
    return np.concatenate([[prefix], ids]).astype(np.int64) if prefix is not None else ids


def solution_inputs(
    tokenizer: ByteTokenizer,
    question: str,
    solution: str,
    *,
    mode: PromptMode = "store",
    chat_tokenizer: ByteTokenizer | None = None,
    system: str | None = SYSTEM_PROMPT,
) -> tuple[np.ndarray, int, int]:
    """Ids of prompt + solution, the first scored position and the bytes scored (module docstring)."""
    if mode == "template":
        prompt = prompt_ids(tokenizer, question, mode=mode, system=system)
        enc = tokenizer.encode(solution)
        return np.concatenate([prompt, enc.ids.astype(np.int64)]), len(prompt), len(solution.encode("utf-8"))
    prompt_text = prompt_view(question, chat_tokenizer, system=system)
    if mode != "store":
        raise ConfigError(f"unknown prompt mode {mode!r}; choose 'store' or 'template'")
    start = len(prompt_text.encode("utf-8"))
    enc = tokenizer.encode(prompt_text + solution)
    scored = np.flatnonzero(enc.spans[:, 1] > start)
    ids = _with_prefix(tokenizer, enc.ids)
    offset = len(ids) - len(enc.ids)
    first = int(scored[0]) + offset if len(scored) else len(ids)
    width = enc.spans[scored, 1] - enc.spans[scored, 0]
    if first == 0:  # no BOS and the solution starts the text: its first token has no context
        first, width = 1, width[1:]
    return ids, first, int(width.sum())


def _tick(progress: Progress | None, description: str, total: int) -> Callable[[int], None]:
    if progress is None:
        return lambda n: None
    progress(description, 0, total)
    return lambda n: progress(description, n, total)


@torch.inference_mode()
def generate_solutions(
    model: torch.nn.Module,
    tokenizer: ByteTokenizer,
    prompts: Sequence[np.ndarray],
    *,
    max_new_tokens: int = 160,
    batch_size: int = 16,
    stop: Callable[[str], bool] = answer_stop,
    progress: Progress | None = None,
) -> list[tuple[str, int]]:
    """Greedy continuations of ``prompts`` (module docstring), batched with left padding.

    Args:
        model: a causal LM; its embedding table must cover the tokenizer's ids.
        tokenizer: the model's tokenizer.
        prompts: (n,) int64 prompt ids each, BOS included (:func:`prompt_ids`).
        max_new_tokens: generation budget per prompt.
        batch_size: prompts decoded together.
        stop: a row stops once ``stop(generated text)`` is true.
        progress: called after each batch.

    Returns:
        ``(generated text, number of new tokens)`` per prompt, in order.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be at least 1")
    device = next(model.parameters()).device
    eos = tokenizer.eos_id
    pad = next(i for i in (tokenizer.pad_id, eos, 0) if i is not None)
    encoded = [np.asarray(p, dtype=np.int64) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    out: list[tuple[str, int]] = [("", 0)] * len(prompts)
    was_training = model.training
    model.eval()
    tick = _tick(progress, "generating", len(prompts))
    try:
        for lo in range(0, len(order), batch_size):
            rows = order[lo : lo + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, L)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(encoded[i]) :] = torch.from_numpy(encoded[i])
                mask[r, width - len(encoded[i]) :] = 1
            for r, (text, count) in zip(rows, _greedy(model, tokenizer, ids.to(device), mask.to(device),
                                                       max_new_tokens=max_new_tokens, eos=eos, stop=stop), strict=True):
                out[r] = (text, count)
            tick(len(rows))
    finally:
        model.train(was_training)
    return out


def _greedy(
    model: torch.nn.Module,
    tokenizer: ByteTokenizer,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos: int | None,
    stop: Callable[[str], bool],
) -> list[tuple[str, int]]:
    """Greedy decoding of one left-padded batch with a KV cache; per-row stop."""
    batch = ids.shape[0]
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L): left padding does not shift positions
    new = [[] for _ in range(batch)]
    done = [False] * batch
    cache = None
    step_ids, step_mask, step_pos = ids, mask, position
    for _ in range(max_new_tokens):
        result = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, cache=cache,
                       use_cache=True, logits_to_keep=1)
        cache = result.cache
        nxt = result.logits[:, -1].float().argmax(-1)  # (B,)
        for r in range(batch):
            if done[r]:
                continue
            token = int(nxt[r])
            if eos is not None and token == eos:
                done[r] = True
                continue
            new[r].append(token)
            if stop(_decode(tokenizer, new[r])):
                done[r] = True
        if all(done):
            break
        step_ids = nxt[:, None]
        step_mask = torch.cat([step_mask, torch.ones((batch, 1), dtype=step_mask.dtype, device=step_mask.device)], -1)
        step_pos = step_pos[:, -1:] + 1
    return [(_decode(tokenizer, row), len(row)) for row in new]


def _decode(tokenizer: ByteTokenizer, ids: list[int]) -> str:
    raw = b"".join(tokenizer.token_bytes[i] for i in ids)
    return raw.decode("utf-8", errors="replace")


@torch.inference_mode()
def solution_bits_per_byte(
    model: torch.nn.Module,
    tokenizer: ByteTokenizer,
    inputs: Sequence[tuple[np.ndarray, int, int]],
    *,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> tuple[float, int]:
    """Total NLL (nats) of the solutions after their prompts, and the bytes it covers.

    Args:
        model, tokenizer: the model under test.
        inputs: per problem ``(ids, first scored position, scored bytes)`` from
            :func:`solution_inputs`.
        batch_size: sequences per forward pass (right-padded).
        progress: called after each batch.

    Returns:
        ``(nll_nats, num_bytes)``; bits per byte = nll / ln 2 / num_bytes.
    """
    device = next(model.parameters()).device
    pad = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    seqs = [(np.asarray(ids, dtype=np.int64), first, nbytes) for ids, first, nbytes in inputs]
    was_training = model.training
    model.eval()
    tick = _tick(progress, "scoring solutions", len(seqs))
    nll, num_bytes = 0.0, 0
    try:
        for lo in range(0, len(seqs), batch_size):
            chunk = seqs[lo : lo + batch_size]
            width = max(len(s[0]) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, L), right-padded
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (seq, _, _) in enumerate(chunk):
                ids[r, : len(seq)] = torch.from_numpy(seq)
                mask[r, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, L, V)
            for r, (seq, first, nbytes) in enumerate(chunk):
                logp = logits[r, first - 1 : len(seq) - 1].float().log_softmax(-1)
                target = ids[r, first : len(seq)].to(logp.device)
                nll -= float(logp.gather(-1, target[:, None]).sum())
                num_bytes += nbytes
            tick(len(chunk))
    finally:
        model.train(was_training)
    return nll, num_bytes


def score_problems(
    model: torch.nn.Module,
    tokenizer: ByteTokenizer,
    problems: Sequence[Problem],
    chat_tokenizer: ByteTokenizer | None,
    *,
    name: str,
    prompt: PromptMode = "store",
    system: str | None = SYSTEM_PROMPT,
    answer_format: str = ANSWER_FORMAT,
    max_new_tokens: int = 160,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> MathsScore:
    """Exact match (greedy) and solution bits per byte of one model on ``problems``.

    Args:
        model, tokenizer: the model under test and its tokenizer.
        problems: the problems (e.g. ``generate("test", n)``).
        chat_tokenizer: the tokenizer whose chat template rendered the training data
            (the teacher's); it defines the ``store`` prompt (:func:`xtd.maths.prompt_view`).
        name: the model's name in the result.
        prompt: ``store`` or ``template`` (module docstring).
        system: the system prompt of the training records (None: none).
        answer_format: ``final-number`` or ``boxed``.
        max_new_tokens, batch_size: generation settings.
        progress: called after each batch.
    """
    prompts = [prompt_ids(tokenizer, p.question, mode=prompt, chat_tokenizer=chat_tokenizer, system=system)
               for p in problems]
    generated = generate_solutions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        stop=lambda text: answer_stop(text, answer_format), progress=progress,
    )
    outputs = tuple(
        MathsOutput(p.id, p.kind, p.answer, text, extract_answer(text, answer_format),
                    is_correct(text, p.answer, answer_format), count, *check_steps(text))
        for p, (text, count) in zip(problems, generated, strict=True)
    )
    inputs = [solution_inputs(tokenizer, p.question, p.solution, mode=prompt, chat_tokenizer=chat_tokenizer,
                              system=system) for p in problems]
    nll, num_bytes = solution_bits_per_byte(model, tokenizer, inputs, batch_size=batch_size, progress=progress)
    return MathsScore(name, outputs, nll, num_bytes)
