"""Shared reporting for the benchmarks under bench/.

Every benchmark module defines ``run(quick: bool = False) -> dict`` built with
:func:`result`, and ends with ``if __name__ == "__main__": main(run)``. Targets are
ratios or sizes measured within one run, never absolute timings compared across
machines. ``bench/run_all.py`` imports every module, collects the dicts into
``results/bench.json`` and writes ``results/bench.md``.
"""

from __future__ import annotations

import argparse
import json
import operator
import platform
import sys
from collections.abc import Callable
from typing import Any

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def target(value: float, op: str, bound: float, *, unit: str = "") -> dict[str, Any]:
    """One target: ``value op bound`` (e.g. ``ratio >= 0.95``), with its verdict."""
    return {"value": value, "op": op, "target": bound, "unit": unit, "pass": bool(_OPS[op](value, bound))}


def result(name: str, *, metrics: dict[str, Any], targets: dict[str, dict[str, Any]], setup: str) -> dict[str, Any]:
    """A benchmark's result: what was measured, on what, and which targets hold."""
    return {
        "name": name,
        "setup": setup,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "metrics": metrics,
        "targets": targets,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    """A markdown table of every target (and the metrics beneath each benchmark)."""
    lines = ["| benchmark | quantity | measured | target | ok |", "|---|---|---|---|---|"]
    for res in results:
        for key, t in res["targets"].items():
            unit = f" {t['unit']}" if t.get("unit") else ""
            ok = "yes" if t["pass"] else "**no**"
            lines.append(f"| {res['name']} | {key} | {_fmt(t['value'])}{unit} | {t['op']} {_fmt(t['target'])}{unit} | {ok} |")
    lines.append("")
    for res in results:
        lines.append(f"**{res['name']}** — {res['setup']}")
        lines.append("")
        for key, value in res["metrics"].items():
            lines.append(f"- {key}: {_fmt(value)}")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def main(run: Callable[..., dict[str, Any]]) -> None:
    """Command-line entry of one benchmark: prints one JSON line, then the table on stderr."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smaller size for smoke tests")
    args = parser.parse_args()
    res = run(quick=args.quick)
    print(json.dumps(res))
    print(markdown([res]), file=sys.stderr)
