"""The kinds of maths word problem :mod:`xtd.maths` generates: values, worked steps, wordings.

Each kind is a function that draws one problem's numbers from a ``random.Random`` and
returns the fields its question wordings need, the lines of the worked solution and the
answer; :data:`PHRASINGS` holds the wordings of each kind, the last of which only the
test split uses. Every multi-digit operation is worked out by place value, the way a
careful pupil (or a small model) does it: products split the longer factor
(:func:`times`), sums and differences add or take away the second number one place
value at a time (:func:`plus`, :func:`minus`), so each step changes one digit position
of a running total, with its carry or borrow.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "PHRASINGS", "Draw", "times", "plus", "minus"]


_NAMES = ("Maya", "Leo", "Ana", "Tom", "Priya", "Omar", "Lena", "Sam", "Ivy", "Jonas", "Zoe", "Ravi",
          "Nora", "Ben", "Aisha", "Carlos", "Mia", "Felix", "Hana", "Kofi")


@dataclass(frozen=True)
class Draw:
    """The values of one problem: fields for the wording, the solution lines and the answer."""

    fields: dict[str, Any]
    steps: tuple[str, ...]
    answer: int


def _place_values(n: int) -> list[int]:
    """The non-zero place values of ``n``, largest first: 608 → [600, 8]."""
    digits = str(n)
    return [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]


def times(a: int, b: int) -> str:
    """A product worked out by place value: ``83 * 7 = 80 * 7 + 3 * 7 = 560 + 21 = 581``.

    The factor with more digits is split into its non-zero place values; a product with
    a single place value is written directly (``7 * 40 = 280``).
    """
    big_first = len(str(a)) >= len(str(b))
    big, small = (a, b) if big_first else (b, a)
    parts = _place_values(big)
    if len(parts) <= 1:
        return f"{a} * {b} = {a * b}"
    terms = [f"{part} * {small}" if big_first else f"{small} * {part}" for part in parts]
    values = [str(part * small) for part in parts]
    return f"{a} * {b} = {' + '.join(terms)} = {' + '.join(values)} = {a * b}"


def _running(a: int, b: int, op: str) -> str:
    parts = _place_values(b)
    result = a + b if op == "+" else a - b
    if len(parts) <= 1:
        return f"{a} {op} {b} = {result}"
    sign = 1 if op == "+" else -1
    chain = [f"{a} {op} {b}"]
    total = a
    for k in range(len(parts)):
        chain.append(f" {op} ".join([str(total), *map(str, parts[k:])]))
        total += sign * parts[k]
    chain.append(str(result))
    return " = ".join(chain)


def plus(a: int, b: int) -> str:
    """A sum worked out by place value: ``192 + 25 = 192 + 20 + 5 = 212 + 5 = 217``."""
    return _running(a, b, "+")


def minus(a: int, b: int) -> str:
    """A difference worked out by place value: ``415 - 204 = 415 - 200 - 4 = 215 - 4 = 211``."""
    return _running(a, b, "-")


def _shopping(rng: random.Random) -> Draw:
    item, extra = rng.choice([("notebook", "pen"), ("book", "bookmark"), ("shirt", "belt"),
                              ("ticket", "programme"), ("lamp", "bulb"), ("plant", "pot")])
    count, price, extra_price = rng.randint(3, 9), rng.randint(12, 89), rng.randint(5, 48)
    cost = count * price
    total = cost + extra_price
    return Draw(
        {"name": rng.choice(_NAMES), "item": item, "extra": extra, "count": count, "price": price,
         "extra_price": extra_price},
        (f"The {item}s cost {times(count, price)} dollars.",
         f"With the {extra} that is {plus(cost, extra_price)} dollars."),
        total,
    )


def _travel(rng: random.Random) -> Draw:
    speed, hours, more = rng.randint(35, 95), rng.randint(2, 9), rng.randint(12, 240)
    first = speed * hours
    total = first + more
    return Draw(
        {"name": rng.choice(_NAMES), "speed": speed, "hours": hours, "more": more,
         "vehicle": rng.choice(["car", "bus", "train", "truck"])},
        (f"At {speed} km per hour for {hours} hours it covers {times(speed, hours)} km.",
         f"Then the whole trip is {plus(first, more)} km."),
        total,
    )


def _sharing(rng: random.Random) -> Draw:
    people = rng.randint(3, 9)
    share = rng.randint(6, 48)
    boxes = rng.choice([b for b in range(2, 10) if (people * share) % b == 0] or [1])
    per_box = people * share // boxes
    total = boxes * per_box
    item = rng.choice(["pencils", "stickers", "apples", "cards", "marbles", "cookies"])
    return Draw(
        {"name": rng.choice(_NAMES), "boxes": boxes, "per_box": per_box, "people": people, "item": item},
        (f"There are {times(boxes, per_box)} {item} in all.",
         f"Each person gets {total} / {people} = {share} {item}."),
        share,
    )


def _saving(rng: random.Random) -> Draw:
    weekly, weeks = rng.randint(15, 95), rng.randint(4, 9)
    saved = weekly * weeks
    spent = rng.randint(saved // 4, saved - 1)
    left = saved - spent
    return Draw(
        {"name": rng.choice(_NAMES), "weekly": weekly, "weeks": weeks, "spent": spent,
         "thing": rng.choice(["a bike", "a game", "a coat", "a guitar", "shoes", "a tent"])},
        (f"In {weeks} weeks the savings are {times(weekly, weeks)} dollars.",
         f"After buying, {minus(saved, spent)} dollars are left."),
        left,
    )


def _collection(rng: random.Random) -> Draw:
    first, more = rng.randint(120, 899), rng.randint(35, 499)
    second = first + more
    together = first + second
    given = rng.randint(11, min(299, together - 1))
    left = together - given
    item = rng.choice(["stamps", "shells", "coins", "beads", "cards", "stones"])
    return Draw(
        {"name": rng.choice(_NAMES), "friend": rng.choice(_NAMES), "first": first, "more": more,
         "given": given, "item": item},
        (f"The friend has {plus(first, more)} {item}.",
         f"Together they have {plus(first, second)} {item}.",
         f"After giving some away, {minus(together, given)} {item} remain."),
        left,
    )


def _liquid(rng: random.Random) -> Draw:
    litres, poured, cups = rng.randint(2, 9), rng.randint(3, 9), rng.randint(110, 350)
    ml = litres * 1000
    used = poured * cups
    if used >= ml:
        cups = rng.randint(110, ml // poured - 1)
        used = poured * cups
    left = ml - used
    return Draw(
        {"litres": litres, "poured": poured, "cups": cups,
         "drink": rng.choice(["juice", "milk", "water", "lemonade", "tea"])},
        (f"{litres} litres are {times(litres, 1000)} ml.",
         f"The glasses take {times(poured, cups)} ml.",
         f"So {minus(ml, used)} ml are left."),
        left,
    )


def _schedule(rng: random.Random) -> Draw:
    lessons, minutes, brk = rng.randint(3, 8), rng.randint(25, 55), rng.randint(10, 35)
    teaching = lessons * minutes
    total = teaching + brk * (lessons - 1)
    pauses = brk * (lessons - 1)
    return Draw(
        {"name": rng.choice(_NAMES), "lessons": lessons, "minutes": minutes, "brk": brk},
        (f"The lessons take {times(lessons, minutes)} minutes.",
         f"There are {lessons} - 1 = {lessons - 1} breaks of {brk} minutes, so {times(lessons - 1, brk)} minutes.",
         f"The day lasts {plus(teaching, pauses)} minutes."),
        total,
    )


def _harvest(rng: random.Random) -> Draw:
    rows, per_row = rng.randint(3, 9), rng.randint(13, 97)
    grown = rows * per_row
    sold = rng.randint(grown // 5, grown - 1)
    left = grown - sold
    crop = rng.choice(["cabbages", "pumpkins", "melons", "lettuces", "carrots"])
    return Draw(
        {"name": rng.choice(_NAMES), "rows": rows, "per_row": per_row, "sold": sold, "crop": crop},
        (f"The field grows {times(rows, per_row)} {crop}.",
         f"After the sale, {minus(grown, sold)} {crop} are left."),
        left,
    )


# Question wordings per kind; the last one of every kind is held out for the test split.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "shopping": (
        "{name} buys {count} {item}s for {price} dollars each and a {extra} for {extra_price} dollars. "
        "How many dollars does {name} spend?",
        "A {item} costs {price} dollars and a {extra} costs {extra_price} dollars. {name} buys {count} {item}s "
        "and one {extra}. What is the total cost in dollars?",
        "At the shop, {name} pays for one {extra} ({extra_price} dollars) and {count} {item}s at {price} dollars "
        "apiece. How much money, in dollars, does that come to?",
    ),
    "travel": (
        "A {vehicle} drives at {speed} km per hour for {hours} hours and then goes {more} km more. "
        "How many km does it travel in total?",
        "{name} takes a {vehicle} that moves {speed} km every hour. After {hours} hours it still has {more} km "
        "to go before arriving. How long is the whole trip in km?",
        "How many kilometres is a journey that is {hours} hours by {vehicle} at {speed} km per hour followed by "
        "another {more} km?",
    ),
    "sharing": (
        "{name} has {boxes} boxes with {per_box} {item} in each box. The {item} are shared equally among "
        "{people} people. How many {item} does each person get?",
        "There are {per_box} {item} in each of {boxes} boxes. If {people} friends split all of them equally, "
        "how many {item} does each friend receive?",
        "{people} children divide the {item} from {boxes} boxes, each box holding {per_box}, so that everyone "
        "gets the same number. How many {item} per child?",
    ),
    "saving": (
        "{name} saves {weekly} dollars every week for {weeks} weeks and then buys {thing} for {spent} dollars. "
        "How many dollars are left?",
        "Every week {name} puts {weekly} dollars in a jar. After {weeks} weeks, {name} spends {spent} dollars on "
        "{thing}. How much money remains in dollars?",
        "How many dollars does {name} keep after saving {weekly} dollars a week for {weeks} weeks and paying "
        "{spent} dollars for {thing}?",
    ),
    "collection": (
        "{name} has {first} {item}. {friend} has {more} more {item} than {name}. Together they give away "
        "{given} {item}. How many {item} do they have left?",
        "{friend} owns {more} {item} more than {name}, who owns {first}. They put their {item} together and "
        "give {given} of them to a museum. How many {item} remain?",
        "{name} collects {first} {item}, and {friend} collects {more} more than that. If the two of them donate "
        "{given} {item}, how many are still theirs?",
    ),
    "liquid": (
        "A jug holds {litres} litres of {drink}. {poured} glasses of {cups} ml each are poured from it. "
        "How many ml of {drink} are left in the jug?",
        "There are {litres} litres of {drink}. Someone fills {poured} glasses with {cups} ml each. How many "
        "millilitres of {drink} remain?",
        "After pouring {cups} ml of {drink} into each of {poured} glasses from a {litres}-litre bottle, how much "
        "{drink} is left in ml?",
    ),
    "schedule": (
        "{name} has {lessons} lessons of {minutes} minutes each, with a {brk}-minute break between two lessons. "
        "How many minutes does the school day last?",
        "A school day has {lessons} lessons, each {minutes} minutes long, and a break of {brk} minutes between "
        "consecutive lessons. How long is the day in minutes?",
        "How many minutes pass from the start of the first to the end of the last of {lessons} lessons of "
        "{minutes} minutes if every pause between lessons lasts {brk} minutes?",
    ),
    "harvest": (
        "{name} plants {rows} rows of {crop} with {per_row} {crop} in each row and sells {sold} of them. "
        "How many {crop} are left?",
        "A field has {rows} rows and each row grows {per_row} {crop}. {name} sells {sold} {crop} at the market. "
        "How many {crop} does {name} still have?",
        "{name} harvests {per_row} {crop} from each of {rows} rows and then sells {sold}. How many {crop} remain "
        "unsold?",
    ),
}

KINDS: dict[str, Callable[[random.Random], Draw]] = {
    "shopping": _shopping,
    "travel": _travel,
    "sharing": _sharing,
    "saving": _saving,
    "collection": _collection,
    "liquid": _liquid,
    "schedule": _schedule,
    "harvest": _harvest,
}
"""Problem kinds: each draws the values and the worked steps of one problem."""
