"""Grade-school maths word problems that ship with xtd, and their exact-match scoring.

**Problems.** :func:`generate` draws word problems from a seeded stream: a handful of
problem *kinds* (shopping, travel, sharing, saving, unit conversion, …), each a
two- or three-step computation with multi-digit numbers (carries and borrows
included) in some unit, worded by one of several question *phrasings*. Every problem
has a step-by-step worked solution, one computation per line (products worked out by place
value, :mod:`xtd.maths_kinds`), ending in the answer line.

**Answer format.** The last line of a solution is ``#### <integer>`` (the GSM8K
convention). :func:`extract_answer` reads a model's answer from generated text: the
number directly after the first ``####`` marker (optional sign, digits with optional
``,`` thousands separators, optional decimal part), whatever follows it on the line
ignored. No marker, or no number right after it, is no answer. :func:`is_correct`
compares that number with the reference by exact decimal value (``95``, ``95.0`` and
``0,095`` all equal ``95``; ``950``, ``9.5`` and ``94`` do not). The ``boxed`` format
(``\\boxed{95}``, the convention of OpenMath2 and MATH solutions) is read the same way
for the GPU recipe (``experiments/maths_gpu.py``).

**Splits**, disjoint by construction:

* Every kind has several question wordings; the last one is *held out*: only test
  problems use it, so no test question in it can equal a training question.
* A question in any other (*seen*) wording belongs to the split that a hash of its
  text picks (:func:`split_of_question`: bucket 0 of :data:`HASH_BUCKETS` validation,
  bucket 1 test, the rest train); each split rejects draws that belong to another.
* Test problems alternate, round by round of kinds, between held-out and seen
  wordings: half measure new wordings, half new questions in familiar wordings.
* Each split draws from its own seeded stream (``[split salt, seed]``), and within a
  split a repeated question is redrawn, so a split holds no duplicate either.

**Records.** :func:`chat_record` renders a problem as a conversation
(``{"messages": [user question, assistant solution], ...}``), which ``xtd
precompute`` renders with the teacher's chat template (the assistant turn is the loss
span) and ``xtd train`` reads from the store. :func:`task_record` gives the
``{"prompt", "answer"}`` line of an ``xtd eval --task`` file; :func:`write_split`
writes either.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from xtd.errors import ConfigError
from xtd.maths_kinds import KINDS, PHRASINGS

if TYPE_CHECKING:
    from xtd.config import MathsConfig
    from xtd.tokenization import ByteTokenizer

__all__ = [
    "Problem",
    "SPLITS",
    "KINDS",
    "PHRASINGS",
    "ANSWER_MARKER",
    "ANSWER_FORMAT",
    "ANSWER_FORMATS",
    "HASH_BUCKETS",
    "generate",
    "extract_answer",
    "is_correct",
    "answer_stop",
    "check_steps",
    "AnswerStop",
    "chat_record",
    "conversation",
    "SYSTEM_PROMPT",
    "store_view",
    "prompt_view",
    "task_record",
    "write_split",
    "write_dataset",
    "split_of_question",
    "held_out_phrasing",
]

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
SYSTEM_PROMPT = "Solve the problem step by step."
"""System turn of every chat record (it replaces a template's longer default, e.g. SmolLM2's)."""
ANSWER_MARKER = "####"
"""Starts the answer line of every solution: ``#### 95``."""
ANSWER_FORMAT = "final-number"
"""``answer_format`` of maths task lines: ``xtd eval --task`` scores them by :func:`is_correct`."""
ANSWER_FORMATS = (ANSWER_FORMAT, "boxed")
"""Every ``answer_format``: ``####`` lines (our problems, GSM8K) or ``\\boxed{}`` (OpenMath2, MATH)."""
_BOXED = "\\boxed{"
HASH_BUCKETS = 10
"""Seen-wording partition: hash 0 mod this is validation, 1 test, anything else train."""

_SPLIT_SALT = {"train": 11, "validation": 23, "test": 37}
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_ANSWER_RE = re.compile(re.escape(ANSWER_MARKER) + r"[ \t]*(" + _NUMBER + r")")


@dataclass(frozen=True)
class Problem:
    """One word problem.

    Attributes:
        id: ``<split>-<seed>-<position>``, unique across splits.
        split: ``train``, ``validation`` or ``test``.
        kind: the problem kind (a key of :data:`KINDS`).
        phrasing: index of the question wording within the kind.
        question: the problem text.
        solution: worked steps, one per line, then ``#### <answer>``.
        answer: the final answer, a canonical integer string.
    """

    id: str
    split: str
    kind: str
    phrasing: int
    question: str
    solution: str
    answer: str

    @property
    def new_wording(self) -> bool:
        """True when the question uses its kind's held-out wording (test problems only)."""
        return self.phrasing == len(PHRASINGS[self.kind]) - 1

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what the JSON-lines files hold besides the rendered fields)."""
        return asdict(self)


# --------------------------------------------------------------------------- generation


def split_of_question(question: str) -> Split:
    """The split a question in a *seen* wording belongs to: its hash bucket decides.

    Bucket 0 of :data:`HASH_BUCKETS` is validation, bucket 1 test, every other bucket train.
    """
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "little") % HASH_BUCKETS
    return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


def held_out_phrasing(kind: str) -> int:
    """Index of the wording of ``kind`` that only test problems use (the last one)."""
    return len(PHRASINGS[kind]) - 1


def generate(split: Split, count: int, *, seed: int = 0) -> list[Problem]:
    """``count`` problems of ``split``, the same for the same ``(split, count, seed)``.

    Kinds take turns (problem ``i`` is of kind ``i mod len(KINDS)``); the values and the
    wording are drawn from the split's own stream. Test problems alternate by round of
    kinds between a held-out wording (odd rounds) and a seen wording (even rounds), so
    half of them test new wordings and half new questions in familiar ones. The first
    ``n`` problems of a split do not depend on ``count``.

    Raises:
        ConfigError: an unknown split or a negative count.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if count < 0:
        raise ConfigError(f"problem count ({count}) must be >= 0")
    rng = random.Random(f"xtd-maths/{_SPLIT_SALT[split]}/{seed}")
    kinds = list(KINDS)
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < count:
        kind = kinds[len(problems) % len(kinds)]
        draw = KINDS[kind](rng)
        held_out = held_out_phrasing(kind)
        new_wording = split == "test" and (len(problems) // len(kinds)) % 2 == 1
        phrasing = held_out if new_wording else rng.randrange(held_out)
        question = PHRASINGS[kind][phrasing].format(**draw.fields)
        if question in seen or (not new_wording and split_of_question(question) != split):
            continue
        seen.add(question)
        solution = "\n".join((*draw.steps, f"{ANSWER_MARKER} {draw.answer}"))
        problems.append(Problem(f"{split}-{seed}-{len(problems)}", split, kind, phrasing, question, solution,
                                str(draw.answer)))
    return problems


# --------------------------------------------------------------------------- scoring


def extract_answer(text: str, answer_format: str = ANSWER_FORMAT) -> str | None:
    """The final answer in generated text.

    Args:
        text: what the model wrote.
        answer_format: ``final-number``: the number right after the first ``####``;
            ``boxed``: the content of the last complete ``\\boxed{...}`` (the convention
            of OpenMath2 and MATH solutions).

    Returns:
        The answer as written (``"1,250"``, ``"-3.5"``, ``"\\frac{1}{2}"``), or ``None``
        when the format is not there.

    Raises:
        ConfigError: an unknown ``answer_format``.
    """
    if answer_format == "boxed":
        return _last_boxed(text)
    if answer_format != ANSWER_FORMAT:
        raise ConfigError(f"unknown answer format {answer_format!r}; choose from {', '.join(ANSWER_FORMATS)}")
    marker = text.find(ANSWER_MARKER)
    if marker < 0:
        return None
    match = _ANSWER_RE.match(text, marker)
    return match.group(1) if match else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    while start >= 0:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(_BOXED) : i - 1].strip()
        start = text.rfind(_BOXED, 0, start)  # unclosed: try an earlier one
    return None


_EXPR = r"\d+(?: [-+*/] \d+)*"
_CHAIN_RE = re.compile(rf"{_EXPR}(?: = {_EXPR})+")


def check_steps(text: str) -> tuple[int, int]:
    """How many of the worked steps in ``text`` are arithmetically right: ``(right, steps)``.

    A step is one ``=`` between two expressions of integers and ``+ - * /`` (so
    ``83 * 7 = 80 * 7 + 3 * 7 = 560 + 21 = 581`` holds three steps); a diagnostic of
    partial credit, not part of exact match.
    """
    right = steps = 0
    for chain in _CHAIN_RE.findall(text):
        values = [_evaluate(side) for side in chain.split(" = ")]
        for a, b in zip(values, values[1:], strict=False):
            steps += 1
            right += a is not None and a == b
    return right, steps


def _evaluate(expr: str) -> Fraction | None:
    """The exact value of ``a op b op …`` (``*``/``/`` before ``+``/``-``); None on division by zero."""
    tokens = expr.split(" ")
    terms: list[Fraction] = []
    signs: list[int] = [1]
    value = Fraction(int(tokens[0]))
    for op, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        number = Fraction(int(operand))
        if op == "*":
            value *= number
        elif op == "/":
            if number == 0:
                return None
            value /= number
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
            value = number
    terms.append(value)
    return sum((sign * term for sign, term in zip(signs, terms, strict=True)), Fraction(0))


def _value(number: str) -> Decimal | None:
    try:
        return Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None


def is_correct(generated: str, answer: str, answer_format: str = ANSWER_FORMAT) -> bool:
    """Exact match of the extracted final answer with ``answer``, by decimal value.

    A ``boxed`` answer may also carry ``$`` signs, spaces and a trailing full stop;
    answers that are not numbers (``boxed`` MATH answers such as ``\\frac{1}{2}``)
    match only as identical strings after that clean-up.
    """
    found = extract_answer(generated, answer_format)
    if found is None:
        return False
    if answer_format == "boxed":
        found, answer = _clean_boxed(found), _clean_boxed(answer)
    got, want = _value(found), _value(answer)
    if got is not None and want is not None:
        return got == want
    return answer_format == "boxed" and found == answer


def _clean_boxed(answer: str) -> str:
    return answer.replace("$", "").replace(" ", "").rstrip(".")


def answer_stop(text: str, answer_format: str = ANSWER_FORMAT) -> bool:
    """Stop rule for generation: the answer line is complete.

    ``final-number``: a line break after ``####``; ``boxed``: a line break after a
    complete ``\\boxed{...}``.
    """
    if answer_format == "boxed":
        start = text.rfind(_BOXED)
        return start >= 0 and _last_boxed(text) is not None and "\n" in text[start:]
    marker = text.find(ANSWER_MARKER)
    return marker >= 0 and "\n" in text[marker:]


class AnswerStop:
    """A ``transformers`` stopping criterion: :func:`answer_stop` on each row's new tokens.

    Args:
        tokenizer: the model's ``ByteTokenizer`` (new tokens are decoded by byte view).
        prompt_length: columns of the prompt; later columns are generated.
        answer_format: ``final-number`` or ``boxed``.
    """

    def __init__(self, tokenizer: ByteTokenizer, prompt_length: int, answer_format: str = "final-number") -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.answer_format = answer_format

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        views = self.tokenizer.token_bytes
        done = [
            answer_stop(
                b"".join(views[int(i)] for i in row[self.prompt_length :]).decode("utf-8", errors="replace"),
                self.answer_format,
            )
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------- records


def conversation(question: str, solution: str | None = None, *, system: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The messages of a problem: the system prompt (if any), the question, the solution (if given)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    if solution is not None:
        messages.append({"role": "assistant", "content": solution})
    return messages


def chat_record(problem: Problem) -> dict[str, Any]:
    """The conversation of one problem, for ``xtd precompute --data`` / ``xtd train``."""
    return {"messages": conversation(problem.question, problem.solution), "id": problem.id, "answer": problem.answer}


def store_view(rendered: str, tokenizer: ByteTokenizer) -> str:
    """Rendered chat text as a store keeps it: every special-token string of ``tokenizer`` removed.

    ``xtd precompute`` turns those strings into special rows with empty spans; the
    stored text, which students train on, is what remains.
    """
    strings = {tokenizer.hf.convert_ids_to_tokens(int(i)) for i in tokenizer.special_ids}
    strings = sorted((s for s in strings if s), key=len, reverse=True)
    if not strings:
        return rendered
    return re.sub("|".join(re.escape(s) for s in strings), "", rendered)


def prompt_view(question: str, chat_tokenizer: ByteTokenizer | None, *, system: str | None = SYSTEM_PROMPT) -> str:
    """The prompt of a question as models trained on the store read it (no BOS).

    Args:
        question: the problem text.
        chat_tokenizer: the tokenizer whose chat template rendered the training records
            (the teacher's); ``None`` for the plain ``role: content`` rendering of
            ``xtd precompute --chat-template never``.
        system: the system prompt of the training records (None: they had none).
    """
    messages = conversation(question, system=system)
    if chat_tokenizer is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    rendered = chat_tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return store_view(rendered, chat_tokenizer)


def task_record(problem: Problem, chat_tokenizer: ByteTokenizer | None) -> dict[str, Any]:
    """One line of an ``xtd eval --task`` file: prompt, final answer and its format."""
    return {
        "prompt": prompt_view(problem.question, chat_tokenizer),
        "answer": problem.answer,
        "answer_format": ANSWER_FORMAT,
        "id": problem.id,
    }


def write_split(path: str | Path, records: Sequence[dict[str, Any]] | Iterator[dict[str, Any]]) -> Path:
    """Write records as JSON lines (whole file or nothing: temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def write_dataset(config: MathsConfig) -> dict[str, Path]:
    """What ``xtd maths`` writes: chat records per split and the test task file.

    Returns:
        ``{"train", "validation", "test", "tasks"}`` → the files written.

    Raises:
        ConfigError: a file exists and ``overwrite`` is off.
        TokenizerError: the chat tokenizer does not load.
    """
    from xtd.tokenization import load_tokenizer

    out = Path(config.out)
    files = {name: out / f"{name}.jsonl" for name in SPLITS} | {"tasks": out / "test-tasks.jsonl"}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not config.overwrite:
        raise ConfigError(f"{existing[0]!r} exists; pass --overwrite to replace it, or another --out")
    chat = None if config.chat_tokenizer == "none" else load_tokenizer(config.chat_tokenizer)
    counts = {"train": config.train, "validation": config.validation, "test": config.test}
    problems = {split: generate(split, counts[split], seed=config.seed) for split in SPLITS}
    for split in SPLITS:
        write_split(files[split], [chat_record(p) for p in problems[split]])
    write_split(files["tasks"], [task_record(p, chat) for p in problems["test"]])
    return files
