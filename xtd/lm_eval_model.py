"""An lm-evaluation-harness model for anything xtd writes: subword, byte-level, ensembles.

:class:`XtdLM` implements lm-eval's ``LM`` interface on top of :mod:`xtd.evaluate`'s
scoring (the same BOS convention and windows as bits per byte, through
:func:`xtd.evaluate.score_windows`), so a student moved to any tokenizer — bytes
included — and an ensemble of students that share a tokenizer (combined per position by
``p``, the mean probability, or ``logp``, the renormalised mean log-probability) run any
lm-eval task:

* ``loglikelihood(context, continuation)``: the text ``context + continuation`` is
  encoded once (trailing whitespace of the context moved to the continuation, as lm-eval's
  Hugging Face model does); the continuation's tokens are those ending after the context's
  last byte, scored after the BOS and the tokens before them. ``is_greedy`` says whether
  each of them is the argmax.
* ``loglikelihood_rolling(text)``: the text's total log-likelihood, every token scored once
  (the windows of bits per byte).
* ``generate_until``: greedy decoding (members combined by the same rule) until a stop
  string, EOS or ``max_gen_toks``.

Dimension letters: ``M`` members, ``V`` vocabulary, ``L`` sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from xtd.errors import ConfigError

try:
    from lm_eval.api.model import LM
except ImportError:  # pragma: no cover - the eval extra is not installed
    LM = object  # type: ignore[assignment,misc]

__all__ = ["XtdLM", "load_xtd_lm", "run_benchmarks"]


class XtdLM(LM):  # type: ignore[misc,valid-type]
    """One model, or an ensemble sharing a tokenizer, as an lm-eval ``LM``.

    Args:
        models: the member models (causal LMs over the same ids).
        tokenizer: their :class:`xtd.tokenization.ByteTokenizer`.
        name: how results name the model.
        combine: ``"single"`` for one model; ``"p"`` or ``"logp"`` for an ensemble.
        max_length: tokens per scoring window (default: the members' smallest context, ≤ 2048).
        batch_size: windows per forward pass.
        max_gen_toks: default generation budget of ``generate_until``.
    """

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        tokenizer: Any,
        *,
        name: str = "xtd",
        combine: str = "single",
        max_length: int | None = None,
        batch_size: int = 8,
        max_gen_toks: int = 256,
    ) -> None:
        if LM is object:
            raise ConfigError("lm-eval is not installed: pip install 'xtd[eval]'")
        super().__init__()
        if combine not in ("single", "p", "logp") or (combine == "single") != (len(models) == 1):
            raise ConfigError(f"combine {combine!r} does not fit {len(models)} model(s): one model is 'single', "
                              "an ensemble 'p' or 'logp'")  # fmt: skip
        self.models = list(models)
        self.tok = tokenizer
        self.name = name
        self.combine = combine
        self.prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if self.prefix is None:
            raise ConfigError(f"tokenizer {tokenizer.name!r} has no BOS or EOS token: lm-eval needs one to score "
                              "a continuation from an empty context")  # fmt: skip
        limits = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in self.models]
        context = min([x for x in limits if isinstance(x, int) and x >= 2] or [2048])
        self.max_length = min(max_length or 2048, context)
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        for model in self.models:
            model.eval()

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name (lm-eval keys chat-template caches by it)."""
        return str(self.tok.name).replace("/", "__")

    # ------------------------------------------------------------------ scoring

    def _score(self, seqs: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per sequence: (L,) log-prob of each token given those before (position 0: 0) and greedy flags."""
        from xtd.evaluate import score_windows

        logps = [np.zeros(len(s), np.float64) for s in seqs]
        greedy = [np.ones(len(s), bool) for s in seqs]

        def collect(rule: str, t: int, first: int, token_logp: torch.Tensor, is_max: torch.Tensor) -> None:
            n = len(token_logp)
            logps[t][first : first + n] = token_logp.double().cpu().numpy()
            greedy[t][first : first + n] = is_max.cpu().numpy()

        scorable = [t for t, s in enumerate(seqs) if len(s) >= 2]
        if scorable:
            score_windows(
                self.models, [seqs[t] for t in scorable], max_length=self.max_length,
                stride=max(1, self.max_length // 2), batch_size=self.batch_size, combine=(self.combine,),
                on_tokens=lambda rule, t, first, lp, g: collect(rule, scorable[t], first, lp, g),
            )  # fmt: skip
        return logps, greedy

    def _encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tok.encode(text)
        return np.concatenate([[self.prefix], enc.ids.astype(np.int64)]), enc.spans

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request (module docstring)."""
        seqs, starts = [], []
        for request in requests:
            context, continuation = request.args
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ids, spans = self._encode(context + continuation)
            boundary = len(context.encode("utf-8"))
            first = int(np.searchsorted(spans[:, 1], boundary, side="right")) if len(spans) else 0
            seqs.append(ids)
            starts.append(first + 1)  # + the BOS
        logps, greedy = self._score(seqs)
        out = []
        for request, lp, g, start in zip(requests, logps, greedy, starts, strict=True):
            result = (float(lp[start:].sum()), bool(g[start:].all()))
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text, every token scored once."""
        logps, _ = self._score([self._encode(request.args[0])[0] for request in requests])
        return [float(lp.sum()) for lp in logps]

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def _next_logprobs(self, ids: torch.Tensor, caches: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """(V,) combined next-token log-probs after ``ids`` (1, L), reusing the members' KV caches."""
        member = []
        new_caches = []
        for model, cache in zip(self.models, caches, strict=True):
            inputs = ids if cache is None else ids[:, -1:]
            out = model(input_ids=inputs, past_key_values=cache, use_cache=True)
            member.append(out.logits[0, -1].float().log_softmax(-1))
            new_caches.append(out.past_key_values)
        vocab = min(x.shape[-1] for x in member)
        stacked = torch.stack([x[:vocab] for x in member])  # (M, V)
        if self.combine == "p":
            return stacked.logsumexp(0) - math.log(len(self.models)), new_caches
        if self.combine == "logp":
            return stacked.mean(0).log_softmax(-1), new_caches
        return stacked[0], new_caches

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (``until``) or EOS."""
        device = next(self.models[0].parameters()).device
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = torch.from_numpy(self._encode(context)[0][-(self.max_length - 1) :])[None].to(device)
            caches: list[Any] = [None] * len(self.models)
            generated = bytearray()
            for _ in range(budget):
                if ids.shape[1] >= self.max_length:
                    break
                logp, caches = self._next_logprobs(ids, caches)
                token = int(logp.argmax())
                if token == self.tok.eos_id:
                    break
                generated += self.tok.token_bytes[token]
                text = generated.decode("utf-8", errors="ignore")
                if any(stop in text for stop in until):
                    break
                ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
            text = generated.decode("utf-8", errors="replace")
            for stop in until:
                text = text.split(stop, 1)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out


def load_xtd_lm(
    specs: Sequence[str],
    *,
    tokenizer: str | None = None,
    combine: str = "single",
    dtype: str = "float32",
    device: str = "auto",
    max_length: int | None = None,
    batch_size: int = 8,
) -> XtdLM:
    """Load one model or an ensemble (folders, hub ids, ``embedded:smollm2``) as an :class:`XtdLM`.

    Raises:
        ModelLoadError, TokenizerError: a model or tokenizer that cannot be loaded.
        TokenizerMismatchError: ensemble members that do not share a tokenizer.
    """
    from xtd.evaluate import check_model_tokenizer, check_shared_tokenizer
    from xtd.student import load_causal_lm, model_tokenizer
    from xtd.tokenization import load_tokenizer

    members = []
    for spec in specs:
        model = load_causal_lm(spec, dtype=dtype)
        tok = load_tokenizer(tokenizer) if tokenizer is not None else model_tokenizer(spec)
        check_model_tokenizer(model, tok, model_name=spec)
        members.append((spec, model, tok))
    if len(members) > 1:
        check_shared_tokenizer([(spec, tok) for spec, _, tok in members])
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)  # fmt: skip
    return XtdLM(
        [m.to(target) for _, m, _ in members], members[0][2], name="+".join(specs), combine=combine,
        max_length=max_length, batch_size=batch_size,
    )  # fmt: skip


def run_benchmarks(
    models: Sequence[torch.nn.Module], tokenizer: Any, config: Any, *, name: str, combine: str = "single"
) -> dict[str, dict[str, float]]:
    """``config.tasks`` (an :class:`xtd.config.EvalConfig`) on loaded models: what ``xtd eval --tasks`` runs."""
    from xtd.eval_tasks import run_tasks

    lm = XtdLM(models, tokenizer, name=name, combine=combine, max_length=config.max_length,
               batch_size=max(config.batch_size, 8))  # fmt: skip
    return run_tasks(lm, config.tasks, limit=config.task_limit)
