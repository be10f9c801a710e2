"""``experiment.md`` and the learning-curve plots, regenerated from ``experiment.json``.

Usage::

    python experiments/report.py results     # rewrite results/experiment.md and the plots

Setting A (``table1.py``) and setting B (``smollm2.py``) each write their key of
``experiment.json``; this module renders whatever settings are there.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

__all__ = ["render_markdown", "compact_table", "plot_setting", "write_all"]

SET_TITLES = {
    "validation": "validation (picks the lr)",
    "in_domain": "in-domain held-out",
    "retention": "retention",
    "teacher_samples": "teacher samples",
    "modern": "modern English",
}
SETTING_TITLES = {
    "A": "Setting A — tiny teacher (Shakespeare + Old Testament) → New Testament distillation",
    "B": "Setting B — SmolLM2-135M-Instruct → GPT-2 tokenizer, LoRA, KJV distillation",
}


def _test_sets(setting: dict[str, Any]) -> list[str]:
    return [name for name in setting["teacher"]["bits_per_byte"] if name != "validation"]


def _cell(stat: dict[str, Any] | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    std = stat.get("std")
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {std:.{digits}f}"


def _pct(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    std = stat.get("std")
    return f"{100 * stat['mean']:.0f}%" + ("" if std is None else f" ± {100 * std:.0f}")


def _target_table(setting: dict[str, Any], name: str, target: dict[str, Any]) -> list[str]:
    sets = _test_sets(setting)
    head = "| method | lr | " + " | ".join(SET_TITLES.get(s, s) for s in sets) + " | " + " | ".join(
        f"gap closed: {SET_TITLES.get(s, s)}" for s in sets) + " |"
    lines = [head, "|---|---|" + "---|" * (2 * len(sets))]
    teacher = setting["teacher"]["bits_per_byte"]
    lines.append("| teacher | | " + " | ".join(f"{teacher[s]:.4f}" for s in sets) + " |" + " |" * len(sets))
    lines.append("| FVT initialisation | | " + " | ".join(f"{target['fvt'][s]:.4f}" for s in sets) + " |"
                 + " 0% |" * len(sets))
    for method, result in target["methods"].items():
        summary = result["summary"]
        lines.append(
            f"| {method} | {result['lr']:g} | "
            + " | ".join(_cell(summary["bits_per_byte"][s]) for s in sets) + " | "
            + " | ".join(_pct(summary["gap_closed"][s]) for s in sets) + " |"
        )
    return lines


def compact_table(setting: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """One line per method: bits per byte (mean ± std) and, in brackets, the gap closed."""
    sets = _test_sets(setting)
    teacher = setting["teacher"]["bits_per_byte"]
    lines = ["| method | lr | " + " | ".join(SET_TITLES.get(s, s) for s in sets) + " |", "|---|---|" + "---|" * len(sets)]
    lines.append("| teacher | | " + " | ".join(f"{teacher[s]:.4f}" for s in sets) + " |")
    lines.append("| FVT initialisation | | " + " | ".join(f"{target['fvt'][s]:.4f}" for s in sets) + " |")
    for method, result in target["methods"].items():
        summary = result["summary"]
        cells = [f"{_cell(summary['bits_per_byte'][s])} ({_pct(summary['gap_closed'][s]).split(' ')[0]})" for s in sets]
        lines.append(f"| {method} | {result['lr']:g} | " + " | ".join(cells) + " |")
    return lines


def _grid_table(target: dict[str, Any]) -> list[str]:
    lrs = sorted({lr for r in target["methods"].values() for lr in r["lr_grid"]}, key=float)
    lines = ["| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for method, result in target["methods"].items():
        cells = []
        for lr in lrs:
            value = result["lr_grid"].get(lr)
            mark = "**" if value is not None and float(lr) == result["lr"] else ""
            cells.append("–" if value is None else f"{mark}{value:.4f}{mark}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _diagnostics_table(target: dict[str, Any]) -> list[str]:
    rows = [("FVT initialisation", target.get("fvt_diagnostics"))] + [
        (m, r.get("diagnostics")) for m, r in target["methods"].items()
    ]
    rows = [(m, d) for m, d in rows if d]
    if not rows:
        return []
    buckets = [b["teacher_logprob"] for b in rows[0][1]["buckets"]]
    lines = [
        "| student | groups | dropped | mean σ^S − σ^T | mean gap L^S − L^T (debiased) | "
        + " | ".join(f"gap, L^T in {b}" for b in buckets) + " |",
        "|---|---|---|---|---|" + "---|" * len(buckets),
        "| share of groups | | | | | " + " | ".join(f"{100 * b['share']:.0f}%" for b in rows[0][1]["buckets"]) + " |",
    ]
    for method, d in rows:
        gaps = " | ".join("–" if b["mean_gap"] is None else f"{b['mean_gap']:+.3f}" for b in d["buckets"])
        dropped = "–" if d["dropped_share"] is None else f"{100 * d['dropped_share']:.1f}%"
        lines.append(
            f"| {method} | {d['groups']:,} | {dropped} | {d['mean_sigma_gap']:+.3f} | "
            f"{d['mean_gap']:+.3f} ({d['mean_gap_debiased']:+.3f}) | {gaps} |"
        )
    return lines


def _tasks_table(setting: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """lm-eval's offline tasks beside bits per byte: byte-normalised accuracy (plain accuracy), seed 0."""
    rows = [("teacher", setting["teacher"].get("tasks")), ("FVT initialisation", target.get("fvt_tasks"))]
    rows += [(m, r.get("tasks")) for m, r in target["methods"].items()]
    rows = [(m, t) for m, t in rows if t]
    if not rows:
        return []
    names = list(dict.fromkeys(name for _, t in rows for name in t))
    docs = max(m.get("num_examples", 0) for _, t in rows for m in t.values())
    lines = [f"lm-eval tasks (`xtd eval --tasks`, {docs} documents each, 4 choices, chance 0.25; seed 0; "
             "`xtd_next_line` is held out of all training data, `xtd_next_verse` is the distillation domain):", ""]
    lines += ["| model | " + " | ".join(f"{n}: acc_bytes (acc)" for n in names) + " |", "|---|" + "---|" * len(names)]
    for model, tasks in rows:
        cells = []
        for n in names:
            m = tasks.get(n)
            cells.append("–" if not m else f"{m.get('acc_bytes', float('nan')):.3f} ({m.get('acc', float('nan')):.3f})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(results: dict[str, Any]) -> str:
    """Every setting of ``experiment.json`` as tables (bits per byte: lower is better)."""
    out = ["# Distillation fidelity: Table 1 in the paper's setting", ""]
    for key in sorted(results):
        setting = results[key]
        if not isinstance(setting, dict) or "targets" not in setting:
            continue
        teacher = setting["teacher"]
        out += [f"## {SETTING_TITLES.get(key, key)}", "", f"Produced by `{setting.get('command', '')}` in "
                f"{setting.get('minutes', '?')} min ({_machine(setting)}). {setting.get('description', '')}.", ""]
        facts = [f"{k} {teacher[k]:,}" if isinstance(teacher[k], int) else f"{k} {teacher[k]}"
                 for k in ("name", "parameters", "train_tokens", "tokens_per_parameter", "epochs") if k in teacher]
        if facts:
            out += ["Teacher: " + ", ".join(facts).replace("_", " ") + ".", ""]
        data = setting.get("data") or {}
        if data:
            out += ["Texts (bytes): " + ", ".join(f"{k} {v['texts']} ({v['bytes']:,})" for k, v in data.items()) + ".", ""]
        size = setting.get("size") or {}
        out += [f"Seeds per cell: {setting['protocol']['seeds']} (mean ± sample standard deviation); "
                f"lr grid {', '.join(f'{lr:g}' for lr in setting['protocol']['lrs'])} chosen on "
                f"`{setting['protocol']['validation']}` at seed 0. Bits per byte, lower is better; gap closed = "
                "(FVT − student) / (FVT − teacher).", ""]
        if size.get("epochs"):
            out += [f"Every run: {size['epochs']} epochs over the distillation slice.", ""]
        for name, target in setting["targets"].items():
            out += [f"### → {name} ({target.get('tokenizer', '')}; {target['steps']} steps × "
                    f"{target['batch_size']} texts, length {target['max_length']})", ""]
            out += _target_table(setting, name, target) + [""]
            out += ["Validation bits per byte after the last step, seed 0, per learning rate (chosen in bold):", ""]
            out += _grid_table(target) + [""]
            out += _tasks_table(setting, target)
            diag = _diagnostics_table(target)
            if diag:
                out += ["Diagnostics on the in-domain held-out text (seed 0; merged groups as the ALM loss "
                        "compares them; gap in nats, negative = the student finds the text less likely than "
                        "the teacher does):", ""] + diag + [""]
        probe = setting.get("byte_probe")
        if probe:
            out += [f"Byte target (not trained here): the paper's byte recipe ({probe['losses']}, untied, full "
                    f"fine-tuning) ran {probe['seconds_per_step']} s per step of {probe['byte_tokens_per_step']:,} "
                    f"bytes ({probe['tokens_per_s']} bytes/s), measured over {probe['steps']} steps; "
                    "`make experiment-gpu` runs bytes.", ""]
        if setting.get("notes"):
            out += [setting["notes"], ""]
    return "\n".join(out) + "\n"


def _machine(setting: dict[str, Any]) -> str:
    machine = setting.get("machine") or {}
    before, after = machine.get("before"), machine.get("after")
    if not before or not after:
        return "machine state not recorded"
    return (f"{before['cpus']} CPUs; 1-min load average {before['load_average_1_5_15'][0]:.1f} before, "
            f"{after['load_average_1_5_15'][0]:.1f} after, 15-min {after['load_average_1_5_15'][2]:.1f}")


def plot_setting(setting: dict[str, Any], path: Path) -> None:
    """Learning curves: one panel per evaluation set and target; mean over seeds with a min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = _test_sets(setting)
    targets = list(setting["targets"].items())
    fig, axes = plt.subplots(len(targets), len(sets), figsize=(4.2 * len(sets), 3.4 * len(targets)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for row, (name, target) in enumerate(targets):
        for col, s in enumerate(sets):
            ax = axes[row][col]
            for i, (method, result) in enumerate(target["methods"].items()):
                runs = result["runs"]
                epochs = [0.0] + [p["epoch"] for p in runs[0]["curve"]]
                values = [[target["fvt"][s]] + [p[s] for p in r["curve"]] for r in runs]
                n = min(len(v) for v in values)
                mean = [statistics.mean(v[k] for v in values) for k in range(n)]
                ax.plot(epochs[:n], mean, color=colours(i), label=method, lw=1.4)
                if len(values) > 1:
                    lo = [min(v[k] for v in values) for k in range(n)]
                    hi = [max(v[k] for v in values) for k in range(n)]
                    ax.fill_between(epochs[:n], lo, hi, color=colours(i), alpha=0.2, lw=0)
            ax.axhline(setting["teacher"]["bits_per_byte"][s], color="black", ls=":", lw=1, label="teacher")
            ax.set_title(f"→ {name}: {SET_TITLES.get(s, s)}", fontsize=9)
            ax.set_xlabel("epochs over the distillation slice", fontsize=8)
            if col == 0:
                ax.set_ylabel("bits per byte (lower is better)", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(folder: Path) -> None:
    """Rewrite ``experiment.md`` and ``experiment-<setting>.png`` from ``experiment.json``."""
    results = json.loads((folder / "experiment.json").read_text())
    (folder / "experiment.md").write_text(render_markdown(results))
    for key, setting in results.items():
        if isinstance(setting, dict) and setting.get("targets") and all(
            t["methods"] for t in setting["targets"].values()
        ):
            plot_setting(setting, folder / f"experiment-{key}.png")


if __name__ == "__main__":
    write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "results"))
