"""The bench's figure: held-out PSNR per site for each setting, the LD input marked.

One panel per setting (shared y axis). Sites along x, ordered by size (subjects, largest
first; the tick label gives the count); per site a black bar for the LD input (the baseline
a model has to beat) and one marker per method: federated (filled circle), centralised
(square), local-only (triangle). Values are the site's ALL-cohort mean over its held-out
subjects; a method without a value for a site (not run, failed) has no marker there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from m2diff.report import save_figure

STYLE = {"federated": ("o", "tab:blue"), "centralized": ("s", "tab:orange"),
         "local": ("^", "tab:green")}
LABEL = {"federated": "federated", "centralized": "centralised (pooled)", "local": "local only"}


def plot_bench(rows: Sequence[Mapping[str, Any]], png: Path, title: str = "", key: str = "psnr",
               ylabel: str = "held-out PSNR (dB)") -> Path:
    """Draw ``summary_rows`` (m2diff.bench.summary) into ``png`` (atomic)."""
    settings = list(dict.fromkeys(r["setting"] for r in rows)) or ["(no finished runs)"]
    cols = min(len(settings), 3)
    nrows = math.ceil(len(settings) / cols)
    width = max(4.5, 0.42 * max((len({r["site"] for r in rows if r["setting"] == s}) for s in settings),
                                default=3) + 1.5)
    fig, axes = plt.subplots(nrows, cols, figsize=(width * cols, 3.2 * nrows + 1.3), sharey=True,
                             squeeze=False, layout="constrained")
    for ax, label in zip(axes.flat, settings, strict=False):
        mine = [r for r in rows if r["setting"] == label and r["cohort"] == "ALL"
                and r.get(key) is not None and math.isfinite(float(r[key]))]
        sizes = {r["site"]: r.get("subjects") or 0 for r in mine}
        sites = sorted(sizes, key=lambda s: (-int(sizes[s]), s))
        x = {s: i for i, s in enumerate(sites)}
        ld = [(x[r["site"]], float(r[key])) for r in mine if r["method"] == "LD input"]
        if ld:
            ax.hlines([v for _, v in ld], [i - 0.38 for i, _ in ld], [i + 0.38 for i, _ in ld],
                      colors="black", linewidth=2.2, label="LD input", zorder=2)
        for offset, (method, (marker, color)) in zip((-0.18, 0.0, 0.18), STYLE.items(), strict=True):
            pts = [(x[r["site"]] + offset, float(r[key])) for r in mine if r["method"] == method]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, s=34, color=color,
                           edgecolor="white", linewidth=0.5, label=LABEL[method], zorder=3)
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels([f"{s} ({sizes[s]})" for s in sites], rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.6, max(len(sites), 1) - 0.4)
    for ax in axes.flat[len(settings):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    fig.suptitle(title or "Held-out PSNR per site (subjects in brackets); black bar: LD input",
                 fontsize=9)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize=8,
                   frameon=False)
    return save_figure(fig, png, dpi=150)
