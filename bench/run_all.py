"""Run every benchmark under bench/ and write results/bench.json and results/bench.md.

Usage: ``python bench/run_all.py [--quick] [--only storage,align]``. Each benchmark
module defines ``run(quick=False) -> dict`` (see bench/_common.py); a benchmark that
fails is recorded with its error and the others still run. Exit code 1 when any
benchmark failed to run (a missed target is reported, not an error).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ORDER = ["storage", "align", "losses", "memory", "precompute", "train", "hypernet"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--out", default=str(ROOT / "results"), help="output folder")
    args = parser.parse_args()
    names = [n for n in ORDER if (HERE / f"{n}.py").exists()]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    # Benchmarks import their helpers either as `_common` (run from bench/) or as
    # `bench._common` (run as `python -m bench.NAME` from the root): both must resolve.
    sys.path[:0] = [str(HERE), str(ROOT)]
    from _common import markdown

    results, failures = [], []
    for name in names:
        print(f"== bench/{name}.py", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            res = _load(name).run(quick=args.quick)
            res["wall_s"] = round(time.perf_counter() - start, 1)
            results.append(res)
            print(json.dumps(res), flush=True)
        except Exception:  # one broken benchmark must not hide the others
            failures.append({"name": name, "error": traceback.format_exc()})
            print(traceback.format_exc(), file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only and (out / "bench.json").exists():
        # A partial rerun replaces only the benchmarks it ran.
        previous = json.loads((out / "bench.json").read_text())
        ran = {r["name"] for r in results} | {f["name"] for f in failures}
        results = [r for r in previous.get("results", []) if r["name"] not in ran] + results
        results.sort(key=lambda r: ORDER.index(r["name"]) if r["name"] in ORDER else len(ORDER))
    (out / "bench.json").write_text(json.dumps({"results": results, "failures": failures}, indent=2) + "\n")
    command = "make bench" if not (args.quick or args.only) else "python bench/run_all.py " + " ".join(sys.argv[1:])
    header = f"# Benchmarks\n\nProduced by `{command}`; every target is a ratio or size measured within one run.\n\n"
    failed = "".join(f"\n**{f['name']} failed to run**\n" for f in failures)
    (out / "bench.md").write_text(header + markdown(results) + failed)
    print(markdown(results), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
