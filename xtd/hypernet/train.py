"""Train a hypernetwork from teacher shards: ``xtd hypernet train`` and :func:`train_hypernet`.

Read top to bottom, :func:`_run` is the recipe, built from ``xtd train``'s parts: the run
folder, checkpoints and exact resume (:mod:`xtd.checkpoint`), the data plan, batching
and on-the-fly alignment (:mod:`xtd.train_data`, through
:class:`~xtd.hypernet.data.HypernetStepDataset`), the losses (:mod:`xtd.objective`) and
the loop (:func:`xtd.train.train_steps`). What is new is the model a step runs
(:class:`PredictedLM`): the frozen base model whose input embeddings and output layer are
the hypernetwork's predictions for the step's vocabulary (docs/method.md,
"Hypernetworks"). Only the hypernetwork trains; no teacher model is loaded, the teacher
quantities come from the store.

Dimension letters: ``B`` texts, ``S`` tokens, ``U`` tokens predicted this step, ``H``
hidden size, ``W`` embedding-row width.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xtd.checkpoint import (
    finish_run_folder,
    inspect_run_folder,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_folder,
    save_model_into,
    trainable_parameters,
)
from xtd.config import HypernetTrainConfig, flag
from xtd.errors import ConfigError
from xtd.fvt import EmbeddingLayout
from xtd.hypernet.data import HypernetStepDataset
from xtd.hypernet.model import Hypernet, build_hypernet, save_hypernet
from xtd.hypernet.sampler import TokenizerSampler
from xtd.losses.registry import RunInfo, StudentOutputs, check_stores, loss_specs
from xtd.objective import Objective, build_objective
from xtd.runtime import Distributed
from xtd.train import (
    MetricsRecord,
    open_finished_stores,
    resume_state,
    save_final_checkpoint,
    step_bookkeeping,
    train_steps,
)
from xtd.train import format_line as train_format_line
from xtd.train_data import StepData, build_train_data

logger = logging.getLogger(__name__)

__all__ = ["HypernetTrainResult", "PredictedLM", "StepObjective", "train_hypernet"]


@dataclass
class HypernetTrainResult:
    """What :func:`train_hypernet` returns.

    Attributes:
        out: the run folder (it holds the saved hypernetwork).
        steps: optimizer steps taken in total (including those before a resume).
        tokens: tokens trained on (all ranks, padding excluded).
        losses: the last step's loss terms (``loss`` = weighted sum), empty if no step ran.
        history: one metrics record per step of this process's run.
        nothing_to_do: ``--out`` already held this finished run.
    """

    out: Path
    steps: int
    tokens: int
    losses: dict[str, float] = field(default_factory=dict)
    history: list[MetricsRecord] = field(default_factory=list)
    nothing_to_do: bool = False


class PredictedLM(nn.Module):
    """The frozen base model run on one step's predicted embeddings.

    Set :attr:`pieces` (U, L) to the step's decompositions; :meth:`forward` predicts the
    U embedding rows once per call (so gradients reach the hypernetwork from every
    micro-batch), embeds the micro-batch's local ids (rows of the step's vocabulary) with
    them, runs the base model's body and scores every position against the U predicted
    output rows (and biases).

    Args:
        hypernet: the trainable hypernetwork.
        base: the frozen base causal LM the hypernetwork was built on.

    A base model's embedding scale (an ``embed_scale`` of its input embedding module, e.g.
    Gemma's √H), logit scale and final soft-cap (``logit_scale``,
    ``final_logit_softcapping`` in its config, e.g. Gemma 2) are applied as its own
    modules apply them.

    Raises:
        ConfigError: a base model without a transformer body (``base_model_prefix``).
    """

    def __init__(self, hypernet: Hypernet, base: nn.Module) -> None:
        super().__init__()
        config = getattr(base, "config", None)
        self.logit_scale = float(getattr(config, "logit_scale", None) or 1.0)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        scale = getattr(base.get_input_embeddings(), "embed_scale", None)
        self.embed_scale = float(scale) if scale is not None else 1.0
        self.body_name = getattr(base, "base_model_prefix", "") or ""
        if getattr(base, self.body_name, None) is None:
            raise ConfigError(f"the base model {type(base).__name__} has no transformer body (base_model_prefix)")
        self.hypernet = hypernet
        self.base = base
        self.pieces: Tensor | None = None

    @property
    def layout(self) -> EmbeddingLayout:
        return self.hypernet.layout

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, *, autocast_dtype: torch.dtype | None = None
    ) -> Tensor:
        """(B, S, U) float32 logits over the step's vocabulary.

        Args:
            input_ids: (B, S) rows of the step's vocabulary.
            attention_mask: (B, S).
            autocast_dtype: run the base model's body under autocast (the output layer
                stays float32).
        """
        if self.pieces is None:
            raise RuntimeError("PredictedLM.pieces is not set for this step")
        rows = self.hypernet(self.pieces)  # (U, W)
        h = self.layout.hidden_size
        emb_in = rows[:, :h]
        emb_out = rows[:, h : 2 * h] if self.layout.separate_output else emb_in
        body = getattr(self.base, self.body_name)
        embeds = emb_in[input_ids] * self.embed_scale if self.embed_scale != 1.0 else emb_in[input_ids]  # (B, S, H)
        kwargs = {"inputs_embeds": embeds, "attention_mask": attention_mask.long(), "use_cache": False}
        if autocast_dtype is not None:
            with torch.autocast(input_ids.device.type, dtype=autocast_dtype):
                hidden = body(**kwargs).last_hidden_state
        else:
            hidden = body(**kwargs).last_hidden_state  # (B, S, H)
        logits = hidden.float() @ emb_out.T  # (B, S, U)
        if self.layout.output_bias:
            logits = logits + rows[:, -1]
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


class StepObjective:
    """An :class:`~xtd.objective.Objective` whose student vocabulary is the current step's.

    The training loop calls it as it calls an objective; before each step,
    :attr:`boundary_mask` (U,) and :attr:`stats` are set to the step's.
    """

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.boundary_mask: Tensor | None = None
        self.stats: dict[str, float] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return self.objective.names

    @property
    def weights(self) -> Mapping[str, float]:
        return self.objective.weights

    def __call__(
        self, model: PredictedLM, batch: dict[str, Tensor], normalizers: Mapping[str, float]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The loss terms of ``model`` on ``batch`` (:meth:`Objective.terms`), plus the step's statistics."""
        if self.boundary_mask is None:
            raise RuntimeError("StepObjective.boundary_mask is not set for this step")
        amp = self.objective.amp and batch["input_ids"].device.type == "cuda"
        logits = model(batch["input_ids"], batch["attention_mask"], autocast_dtype=torch.bfloat16 if amp else None)
        outputs = StudentOutputs(input_ids=batch["input_ids"], boundary_mask=self.boundary_mask, logits_=logits)
        terms, stats = self.objective.terms(outputs, batch, normalizers)
        return terms, {**stats, **self.stats}

    def forward_tokens(self, batch: dict[str, Tensor]) -> int:
        """Token positions the frozen model runs on (padded micro-batches: real tokens plus padding)."""
        return int(batch["input_ids"].numel())

    def combine(
        self, terms: Mapping[str, Tensor], counts: Mapping[str, int], last_block: Sequence[nn.Parameter]
    ) -> tuple[Tensor, dict[str, float]]:
        return self.objective.combine(terms, counts, last_block)


def train_hypernet(
    config: HypernetTrainConfig, *, progress: Callable[[MetricsRecord], None] | None = None
) -> HypernetTrainResult:
    """Train a hypernetwork from teacher shards and save it into the run folder.

    Args:
        config: every setting (:class:`~xtd.config.HypernetTrainConfig`).
        progress: called on the main rank after every step with the metrics record (an
            exception raised there stops the run; the last checkpoint resumes it).

    Returns:
        A :class:`HypernetTrainResult`.

    Raises:
        XtdError: bad input, found before the first step.
    """
    ctx = Distributed.from_env(config.device)
    try:
        return _run(config, ctx, progress)
    finally:
        ctx.close()


def _run(
    config: HypernetTrainConfig, ctx: Distributed, progress: Callable[[MetricsRecord], None] | None
) -> HypernetTrainResult:
    from xtd.student import model_tokenizer
    from xtd.tokenization import load_tokenizer

    out = Path(config.out)

    # 1. Checks that need no model: the run folder, stores, losses, tokenizers.
    if inspect_run_folder(out, config) == "done":  # type: ignore[arg-type]
        logger.info("%s %r already holds this finished run; nothing to do", flag("out"), str(out))
        return HypernetTrainResult(out=out, steps=config.max_steps, tokens=0, nothing_to_do=True)
    losses = loss_specs(config.loss_names())
    base_tokenizer = model_tokenizer(config.model)
    stores = open_finished_stores(config.store)
    check_stores(losses, stores, base_tokenizer, config.alm)
    fixed = load_tokenizer(config.fixed_tokenizer) if config.fixed_tokenizer else None
    if config.data.num_workers:
        logger.info("%s is ignored: the tokenizer sampler prepares steps in order, in this process", flag("num_workers"))

    # 2. The run folder (a checkpoint is read and checked before anything changes).
    checkpoint = latest_checkpoint(out) if config.resume else None
    loaded = load_checkpoint(checkpoint, config) if checkpoint is not None else None  # type: ignore[arg-type]
    ctx.barrier()
    if ctx.main:
        prepare_run_folder(out, config)  # type: ignore[arg-type]
    ctx.barrier()

    # 3. The frozen base model and the hypernetwork (identity at initialisation, seeded).
    bundle = build_hypernet(config.model, config.architecture, seed=config.seed)
    model = PredictedLM(bundle.hypernet, bundle.model).to(ctx.device)
    model.train()
    objective = StepObjective(
        build_objective(
            losses, alm=config.alm, weights=dict.fromkeys(config.loss_names(), 1.0),
            boundary_mask=torch.as_tensor(base_tokenizer.boundary_mask(config.alm.boundary_classes), device=ctx.device),
            run=RunInfo(tuple(stores), base_tokenizer, int(bundle.model.config.hidden_size), ctx.device),
            amp=config.amp,
        )
    )  # fmt: skip
    root = nn.ModuleDict({"hypernet": bundle.hypernet})
    params = list(trainable_parameters(root).values())

    # 4. Optimizer, and the resumed state.
    optim = config.optim
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), weight_decay=optim.weight_decay
    )
    start_step, counters = resume_state(checkpoint, loaded, root, optimizer, resume=config.resume, out=out, ctx=ctx)

    # 5. Data: each step's tokenizer, micro-batches and vocabulary.
    data = build_train_data(
        stores, base_tokenizer, losses, data=config.data, alm=config.alm, seed=config.seed,
        rank=ctx.rank, world_size=ctx.world_size,
    )  # fmt: skip
    dataset = HypernetStepDataset(
        data,
        decomposer=bundle.decomposer,
        sampler=None if fixed is not None else TokenizerSampler(base_tokenizer, config.sampler),
        fixed=fixed,
        max_vocab=config.vocab_budget,
        seed=config.seed,
    )

    def steps() -> Iterator[tuple[int, StepData]]:
        """Each step's data, the next step's prepared in a thread while this one trains (in
        step order, so the sampler's state and every draw are those of a sequential run)."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xtd-hypernet-data") as pool:
            ahead = pool.submit(dataset.__getitem__, start_step) if start_step < config.max_steps else None
            for step in range(start_step, config.max_steps):
                t0 = time.perf_counter()
                assert ahead is not None
                item: dict[str, Any] = dict(ahead.result())
                waited = time.perf_counter() - t0
                ahead = pool.submit(dataset.__getitem__, step + 1) if step + 1 < config.max_steps else None
                model.pieces = item["pieces"].to(ctx.device)
                objective.boundary_mask = item["boundary_mask"].to(ctx.device)
                objective.stats = {**item["stats"], "data_wait_s": waited}
                yield step, item  # type: ignore[misc]

    after_step = step_bookkeeping(
        config, ctx, root, optimizer, counters, progress, line=lambda record: format_line(record, objective.names)
    )

    # 6. The loop (xtd train's).
    history = train_steps(
        model, objective, steps(), optimizer=optimizer, params=params, optim=optim,  # type: ignore[arg-type]
        max_steps=config.max_steps, data=data, ctx=ctx, counters=counters, after_step=after_step,
    )  # fmt: skip
    last = {k: float(history[-1][k]) for k in ("loss", *objective.names)} if history else {}

    # 7. Save the hypernetwork (with its config and training settings) into the run folder.
    if ctx.main:
        if config.max_steps > start_step:
            save_final_checkpoint(config, root, optimizer, counters)
        bundle.hypernet.to("cpu")
        metadata = {
            "train": config.to_dict(),
            "teacher": [reader.attrs.get("teacher") for _, reader in stores],
            "steps_done": config.max_steps,
            "tokens_trained": counters.tokens,
            "final_losses": last,
        }
        save_model_into(lambda staging: save_hypernet(bundle, staging, overwrite=True, metadata=metadata), out)
        finish_run_folder(out, config.max_steps, counters.tokens)
    ctx.barrier()
    history = history if ctx.main else []
    return HypernetTrainResult(out=out, steps=config.max_steps, tokens=counters.tokens, losses=last, history=history)


def format_line(record: MetricsRecord, terms: tuple[str, ...]) -> str:
    """One log line: :func:`xtd.train.format_line` with the step's tokenizer (size, bytes per token)."""
    return train_format_line(
        record, terms,
        extra=f" | V {int(record.get('vocab_size', 0)):,}, {float(record.get('bytes_per_token', 0.0)):.2f} bytes/token",
    )  # fmt: skip
