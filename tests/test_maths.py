"""The maths word-problem generator, its splits, records and exact-match scoring."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from xtd.data import DataSource
from xtd.errors import ConfigError
from xtd.maths import (
    KINDS,
    SYSTEM_PROMPT,
    answer_stop,
    chat_record,
    extract_answer,
    generate,
    is_correct,
    split_of_question,
    write_split,
)

_EXPR = r"\d+(?: [-+*/] \d+)*"
_CHAIN = re.compile(rf"{_EXPR}(?: = {_EXPR})+")


def _value(expr: str) -> float:
    """Evaluate ``a op b op c`` with the usual precedence (digits and + - * / only)."""
    assert re.fullmatch(_EXPR, expr), expr
    return eval(expr)  # noqa: S307 - the pattern above admits only integers and + - * /


def test_generator_is_deterministic_per_seed() -> None:
    a, b = generate("train", 60, seed=3), generate("train", 60, seed=3)
    assert a == b
    assert generate("train", 60, seed=4) != a
    # A prefix does not depend on the count.
    assert generate("train", 20, seed=3) == a[:20]
    assert len({p.id for p in a}) == 60


def test_splits_share_no_problem() -> None:
    train = generate("train", 3000)
    validation = generate("validation", 400)
    test = generate("test", 400)
    questions = [{p.question for p in split} for split in (train, validation, test)]
    assert [len(q) for q in questions] == [3000, 400, 400]  # no duplicates inside a split
    assert not questions[0] & questions[1]
    assert not questions[0] & questions[2]
    assert not questions[1] & questions[2]
    # By construction: held-out wordings only in test; seen wordings partitioned by the hash.
    assert not any(p.new_wording for p in train + validation)
    assert sum(p.new_wording for p in test) == 200  # alternate rounds of kinds
    assert {p.kind for p in test if p.new_wording} == {p.kind for p in test if not p.new_wording} == set(KINDS)
    assert all(split_of_question(p.question) == "train" for p in train)
    assert all(split_of_question(p.question) == "validation" for p in validation)
    assert all(split_of_question(p.question) == "test" for p in test if not p.new_wording)
    # Other seeds of train never produce a validation or test question either.
    other = {p.question for p in generate("train", 1000, seed=7)}
    assert not other & (questions[1] | questions[2])
    with pytest.raises(ConfigError, match="unknown split"):
        generate("dev", 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=">= 0"):
        generate("train", -1)


def test_every_step_is_right_and_the_answer_line_ends_the_solution() -> None:
    problems = generate("train", 400) + generate("test", 80)
    assert {p.kind for p in problems} == set(KINDS)
    carries = borrows = worked = 0
    for p in problems:
        lines = p.solution.split("\n")
        assert lines[-1] == f"#### {p.answer}"
        assert extract_answer(p.solution) == p.answer and is_correct(p.solution, p.answer)
        chains = [_CHAIN.findall(line) for line in lines[:-1]]
        assert all(chains), p.solution
        for chain in (c for line in chains for c in line):
            sides = chain.split(" = ")
            assert len({_value(side) for side in sides}) == 1, (p.id, chain)
            worked += len(sides) > 2
            a, op, b = (sides[0].split(" ") + ["", ""])[:3]
            if op == "+" and int(a) % 10 + int(b) % 10 >= 10:
                carries += 1
            if op == "-" and int(a) % 10 < int(b) % 10:
                borrows += 1
        # The last step computes the answer.
        assert chains[-1][-1].split(" = ")[-1] == p.answer
        assert int(p.answer) > 0
    assert carries > 50 and borrows > 50 and worked > 300


def test_check_steps_counts_right_and_wrong_steps() -> None:
    from xtd.maths import check_steps

    assert check_steps(generate("train", 1)[0].solution) == (6, 6)  # 3 * 64 (3 steps), 192 + 25 (3 steps)
    assert check_steps("83 * 7 = 80 * 7 + 3 * 7 = 560 + 21 = 571 dollars") == (2, 3)
    assert check_steps("10 - 2 * 3 = 4 and 12 / 4 = 3; 7 / 0 = 1") == (2, 3)
    assert check_steps("no arithmetic, 12 apples") == (0, 0)


def test_sums_and_differences_are_worked_out_by_place_value() -> None:
    from xtd.maths_kinds import minus, plus

    assert plus(192, 25) == "192 + 25 = 192 + 20 + 5 = 212 + 5 = 217"
    assert plus(440, 669) == "440 + 669 = 440 + 600 + 60 + 9 = 1040 + 60 + 9 = 1100 + 9 = 1109"
    assert minus(415, 204) == "415 - 204 = 415 - 200 - 4 = 215 - 4 = 211"
    assert minus(9000, 608) == "9000 - 608 = 9000 - 600 - 8 = 8400 - 8 = 8392"
    assert plus(5, 3) == "5 + 3 = 8" and minus(1137, 20) == "1137 - 20 = 1117"


def test_products_are_worked_out_by_place_value() -> None:
    from xtd.maths_kinds import times as _times

    assert _times(83, 7) == "83 * 7 = 80 * 7 + 3 * 7 = 560 + 21 = 581"
    assert _times(4, 152) == "4 * 152 = 4 * 100 + 4 * 50 + 4 * 2 = 400 + 200 + 8 = 608"
    assert _times(7, 40) == "7 * 40 = 280"
    assert _times(9, 1000) == "9 * 1000 = 9000"
    assert _times(3, 5) == "3 * 5 = 15"


@pytest.mark.parametrize(
    ("generated", "expected", "correct"),
    [
        ("3 * 64 = 192\n192 + 25 = 217\n#### 217", "217", True),
        ("#### 217", "217", True),
        ("####217 dollars", "217", True),            # extra text after the number is ignored
        ("The answer is clear.\n#### 217.\nBye", "217", True),
        ("#### 217.0", "217", True),                  # same value
        ("#### 1,250", "1250", True),                 # thousands separators
        ("#### 0217", "217", True),
        ("#### -217", "-217", True),
        ("#### 2170", "217", False),                  # near misses
        ("#### 21.7", "217", False),
        ("#### 216", "217", False),
        ("#### -217", "217", False),
        ("#### 217.5", "217", False),
        ("The answer is 217.", "217", False),         # wrong format: no marker
        ("217", "217", False),
        ("#### two hundred", "217", False),           # no number after the marker
        ("#### \n217", "217", False),
        ("### 217", "217", False),
        ("#### 216\n#### 217", "217", False),         # the first answer counts
        ("", "217", False),
    ],
)
def test_exact_match_reads_the_final_answer_only(generated: str, expected: str, correct: bool) -> None:
    assert is_correct(generated, expected) is correct


@pytest.mark.parametrize(
    ("generated", "expected", "correct"),
    [
        ("So the total is $\\boxed{72}$.", "72", True),
        ("\\boxed{1,250}", "1250", True),
        ("first \\boxed{3} then \\boxed{72}", "72", True),        # the last box counts
        ("\\boxed{72.}", "72", True),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),      # non-numbers: identical strings
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
        ("\\boxed{720}", "72", False),
        ("#### 72", "72", False),                                   # the other format
        ("\\boxed{72", "72", False),                               # unclosed
    ],
)
def test_boxed_answers(generated: str, expected: str, correct: bool) -> None:
    assert is_correct(generated, expected, "boxed") is correct


def test_extract_answer_and_stop_rule() -> None:
    assert extract_answer("work\n#### 1,250 ml") == "1,250"
    assert extract_answer("no marker 12") is None
    assert extract_answer("#### x 12") is None
    assert not answer_stop("3 * 4 = 12\n")
    assert not answer_stop("#### 12")  # the line may continue (123…)
    assert answer_stop("#### 12\n")
    assert answer_stop("#### 12\nmore")
    assert extract_answer("a \\boxed{x^{2}} b", "boxed") == "x^{2}"
    assert not answer_stop("\\boxed{12}", "boxed") and answer_stop("\\boxed{12}$.\n", "boxed")
    assert not answer_stop("\\boxed{1\n", "boxed")
    with pytest.raises(ConfigError, match="unknown answer format"):
        extract_answer("#### 1", "words")


def test_chat_records_are_data_for_precompute(tmp_path: Path) -> None:
    problems = generate("train", 5)
    path = write_split(tmp_path / "train.jsonl", [chat_record(p) for p in problems])
    source = DataSource(str(path))
    assert source.text_field == "messages"
    records = list(source)
    assert len(records) == 5
    assert records[0].messages is not None
    assert [m["role"] for m in records[0].messages] == ["system", "user", "assistant"]
    assert records[0].messages[0]["content"] == SYSTEM_PROMPT
    assert records[0].messages[-1]["content"] == problems[0].solution
    line = json.loads(path.read_text().splitlines()[0])
    assert line["answer"] == problems[0].answer and line["id"] == problems[0].id
