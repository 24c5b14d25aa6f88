"""Aggregating per-seed results into tables (markdown, CSV) and plots."""
from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

Results = Mapping[str, Mapping[str, Sequence[float]]]  # variant -> setting -> per-seed values
Pairs = Sequence[tuple[str, str]]  # (variant, the variant it is compared with)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def difference(values: Sequence[float], base: Sequence[float]) -> str:
    """The mean difference to the baseline; with per-seed pairs (the same seeds, in the same order),
    also the sample std of the paired differences, which seed-to-seed swings shared by both
    starts do not inflate."""
    if len(values) == len(base) > 1:
        m, s = mean_std([v - b for v, b in zip(values, base)])
        return f"{m:+.1f} ± {s:.1f}"
    return f"{mean_std(values)[0] - mean_std(base)[0]:+.1f}"


def comparisons(results: Results, baseline: str | None = None, compare: Pairs = ()) -> list[tuple[str, str]]:
    """Each variant against ``baseline``, then the pairs of ``compare``."""
    return [(v, baseline) for v in results if baseline is not None and v != baseline] + [tuple(p) for p in compare]


def table_rows(results: Results, settings: Sequence[str], baseline: str | None = None, compare: Pairs = ()) -> list[list[str]]:
    """One row per setting: mean ± std of each variant, then the differences of :func:`comparisons`."""
    rows = []
    for setting in settings:
        row = [setting]
        for variant in results:
            m, s = mean_std(results[variant].get(setting, []))
            row.append(f"{m:.1f} ± {s:.1f}")
        row += [difference(results[v].get(setting, []), results[b].get(setting, [])) for v, b in comparisons(results, baseline, compare)]
        rows.append(row)
    return rows


def header(results: Results, setting_name: str, baseline: str | None = None, compare: Pairs = ()) -> list[str]:
    return [setting_name, *results, *(f"{v} - {b}" for v, b in comparisons(results, baseline, compare))]


def markdown_table(results: Results, settings: Sequence[str], setting_name: str, baseline: str | None = None,
                   compare: Pairs = ()) -> str:
    head = header(results, setting_name, baseline, compare)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results, settings, baseline, compare)]
    return "\n".join(lines) + "\n"


def text_table(results: Results, settings: Sequence[str], setting_name: str, baseline: str | None = None,
               compare: Pairs = ()) -> str:
    head = header(results, setting_name, baseline, compare)
    rows = [head, *table_rows(results, settings, baseline, compare)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows) + "\n"


def csv_text(results: Results, settings: Sequence[str], setting_name: str) -> str:
    """Long format: setting, variant, mean, std, n, then the per-seed values."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([setting_name, "variant", "mean", "std", "n", "values"])
    for setting in settings:
        for variant, by_setting in results.items():
            values = list(by_setting.get(setting, []))
            m, s = mean_std(values)
            writer.writerow([setting, variant, f"{m:.3f}", f"{s:.3f}", len(values), " ".join(f"{v:.3f}" for v in values)])
    return out.getvalue()


def plot(results: Results, settings: Sequence[str], path: Path, xlabel: str, title: str, log_x: bool = False) -> None:
    """mIoU (mean ± std over seeds) against the setting, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        xs, numeric = [float(s) for s in settings], True
    except ValueError:
        xs, numeric = list(range(len(settings))), False
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for variant, by_setting in results.items():
        stats = [mean_std(by_setting.get(s, [])) for s in settings]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=variant)
    if log_x and numeric:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels(list(settings))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
