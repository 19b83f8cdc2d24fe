"""Reports: rich tables, atomic CSV/JSON writers and PNG figures (matplotlib Agg).

Every file is written to a temporary name beside its target and renamed into place, so a
reader (a browser refreshing the per-round figure, a script reading metrics.json) never sees
half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

# Column key -> (header, format); unknown keys are printed with str().
FORMATS: dict[str, tuple[str, str]] = {
    "psnr": ("PSNR dB", "{:.2f}"),
    "ssim": ("SSIM", "{:.4f}"),
    "nmse": ("NMSE", "{:.4f}"),
    "suvr_bias_pct": ("SUVR bias %", "{:+.2f}"),
    "train_s": ("train s", "{:.1f}"),
    "sample_s": ("sample s/vol", "{:.2f}"),
    "epsilon": ("epsilon", "{:.3g}"),
}


# ---------------------------------------------------------------------------- writing files
def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (the directory entry itself is on disk after
    this; without it a power cut right after ``os.replace`` can bring the old file back)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any, binary: bool = False) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync it, rename it into
    place and fsync the folder: a reader sees the old or the new file, never a part, also
    after a crash or power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w", newline=None if binary else "") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_folder(path.parent)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically (configuration files, ledgers)."""
    return _atomic_write(path, lambda fh: fh.write(text))


def _plain(value: Any) -> Any:
    """JSON-safe value: numpy scalars to Python, non-finite floats to None, paths to str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN/inf become null), atomically."""
    text = json.dumps(_plain(obj), indent=2)
    return _atomic_write(path, lambda fh: fh.write(text + "\n"))


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV (columns: ``columns`` or the union of keys in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _plain(row.get(k, "")) for k in columns})
    return _atomic_write(path, lambda fh: fh.write(buf.getvalue()))


def save_figure(fig: plt.Figure, png: Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    try:
        return _atomic_write(Path(png), lambda fh: fig.savefig(fh, format="png", dpi=dpi), binary=True)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- tables
def fmt(key: str, value: Any) -> str:
    """Format one cell: known metric keys get their precision, NaN becomes '-'."""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf"
        return FORMATS.get(key, ("", "{:.4g}"))[1].format(float(value))
    return "" if value is None else str(value)


def header(key: str) -> str:
    return FORMATS.get(key, (key, ""))[0]


def cells(row: Mapping[str, Any], columns: Sequence[str]) -> list[str]:
    """Formatted cells of one row; a column ``x`` shows ``x ± x_std`` when ``x_std`` is finite."""
    out = []
    for key in columns:
        cell = fmt(key, row.get(key))
        std = row.get(f"{key}_std")
        if isinstance(std, float) and math.isfinite(std) and cell not in ("-", "inf"):
            cell += f" ± {fmt(key, std).lstrip('+')}"
        out.append(cell)
    return out


def make_table(rows: Sequence[Mapping[str, Any]], title: str, columns: Sequence[str]) -> Table:
    """A rich Table with one row per dict; a column ``x`` shows ``x +- x_std`` when present."""
    # Text, not markup: a site name or folder such as "[/bold]" is shown as it is (rich would
    # parse it as a closing tag and raise).
    table = Table(title=Text(title), title_justify="left")
    for key in columns:
        table.add_column(header(key), justify="left" if key in ("site", "method", "cohort", "subject") else "right")
    for row in rows:
        table.add_row(*(Text(c) for c in cells(row, columns)))
    return table


def print_table(rows: Sequence[Mapping[str, Any]], title: str, columns: Sequence[str],
                console: Console | None = None) -> None:
    """Print ``rows`` as a rich table with the given columns (keys of the dicts)."""
    # Piped output (logs, CI) would otherwise be wrapped at 80 columns.
    console = console or Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    console.print(make_table(rows, title, columns))


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The same table as GitHub markdown (for the README)."""
    lines = ["| " + " | ".join(header(c) for c in columns) + " |",
             "|" + "|".join("---" if c in ("site", "method", "cohort") else "---:" for c in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cells(row, columns)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- figures
def _robust_max(img: np.ndarray) -> float:
    finite = img[np.isfinite(img)]
    vmax = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    return vmax if vmax > 0 else 1.0


def plot_panel(cases: Sequence[Mapping[str, Any]], png: Path, title: str = "") -> Path:
    """Slice panel: one row per case, columns T1 / LD / enhanced / SD / |error|
    (no "enhanced" column when no case has a prediction).

    ``cases``: dicts with ``label`` (row title) and 2D (X, Y) arrays ``t1`` (may be None),
    ``ld``, ``pred`` (may be None), ``sd``. PET columns share the SD's display range;
    |error| = |pred - sd| (or |ld - sd| without a prediction) on its own scale.
    """
    with_pred = any(c.get("pred") is not None for c in cases)
    cols = ["T1", "LD", "enhanced", "SD", "|error|"] if with_pred else ["T1", "LD", "SD", "|error|"]
    n = max(1, len(cases))
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.3 * n + 0.4), squeeze=False)
    for i, case in enumerate(cases):
        sd = np.asarray(case["sd"], dtype=np.float32)
        vmax = _robust_max(sd)
        pred = case.get("pred")
        err = np.abs((pred if pred is not None else case["ld"]) - sd)
        images = [case.get("t1"), case["ld"], pred, sd, err] if with_pred else [
            case.get("t1"), case["ld"], sd, err]
        for j, (name, img) in enumerate(zip(cols, images, strict=True)):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name if name != "|error|" or with_pred else "|LD - SD|", fontsize=9)
            if j == 0:
                ax.set_ylabel(str(case.get("label", "")), fontsize=8)
            if img is None:
                ax.set_facecolor("0.85")
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                continue
            img = np.asarray(img, dtype=np.float32)
            if name == "T1":
                kw = {"cmap": "gray", "vmin": 0.0, "vmax": _robust_max(img)}
            elif name == "|error|":
                kw = {"cmap": "magma", "vmin": 0.0, "vmax": max(vmax * 0.25, 1e-6)}
            else:
                kw = {"cmap": "hot", "vmin": 0.0, "vmax": vmax}
            # (X, Y) -> display with anterior up: rows = Y reversed.
            ax.imshow(np.rot90(img), interpolation="nearest", **kw)
    if not cases:
        for ax in axes[0]:
            ax.axis("off")
        axes[0, 0].text(0, 0.5, "no subjects", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, png)


def plot_rounds(rows: Iterable[Mapping[str, Any]], png: Path, title: str = "") -> Path:
    """Per-round figure: PSNR and SSIM vs round, one line per (site, cohort), with a faint
    flat line at the LD input's value (``ld_psnr`` / ``ld_ssim``) where rows carry it.

    ``rows``: dicts with ``round``, ``site``, ``cohort`` and ``psnr`` / ``ssim`` (missing or
    non-finite values, and rows with ``n == 0``, are skipped). One colour per site; solid CN,
    dashed AD, dotted other cohorts (e.g. ALL). Rewritten atomically after every federated round.
    """
    series: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("n") is not None and float(row["n"]) == 0:
            continue  # a cohort the site does not have: its 0.0 values are placeholders
        series.setdefault((str(row.get("site", "")), str(row.get("cohort", ""))), []).append(row)
    sites = sorted({site for site, _ in series})
    colors = {site: plt.get_cmap("tab10")(i % 10) for i, site in enumerate(sites)}
    spent = _epsilon_series(series)
    fig, axes = plt.subplots(1, 3 if spent else 2, figsize=(14 if spent else 10, 3.8))
    if spent:
        _plot_epsilon(axes[2], spent, colors)
    for ax, key, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        for (site, cohort), items in sorted(series.items()):
            pts = sorted((float(r["round"]), float(r[key])) for r in items
                         if r.get(key) is not None and r.get("round") is not None
                         and math.isfinite(float(r[key])))
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            style = {"CN": "-", "AD": "--"}.get(cohort.upper(), ":")
            ax.plot(xs, ys, marker="o", linestyle=style, color=colors[site],
                    label=f"{site} {cohort}".strip())
            ld = [float(r[f"ld_{key}"]) for r in items if r.get(f"ld_{key}") is not None]
            if ld and math.isfinite(ld[-1]):
                # The LD input of the same subjects: the baseline the model has to beat.
                ax.plot([min(xs), max(xs)], [ld[-1], ld[-1]], linestyle=style, linewidth=0.8,
                        color=colors[site], alpha=0.35)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title or "Held-out metrics of the global model per round (solid CN, dashed AD, dotted all; faint: LD input)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86 if handles else 1, 1))
    return save_figure(fig, png)


def _epsilon_series(series: Mapping[tuple[str, str], list[Mapping[str, Any]]]
                    ) -> dict[str, list[tuple[float, float]]]:
    """Cumulative epsilon per round: per site (``train_dp_epsilon``, sample-level DP) and
    for the federation (``central_dp_epsilon``, client-level DP, key "all sites")."""
    from m2diff.wire import EPSILON_KEYS

    out: dict[str, dict[float, float]] = {}
    for (site, _), items in series.items():
        for r in items:
            for key, name in zip(EPSILON_KEYS, (site, "all sites (client level)"), strict=True):
                value = r.get(key)
                if value is not None and r.get("round") is not None and math.isfinite(float(value)):
                    out.setdefault(name, {})[float(r["round"])] = float(value)
    return {name: sorted(points.items()) for name, points in out.items()}


def _plot_epsilon(ax: plt.Axes, spent: Mapping[str, list[tuple[float, float]]],
                  colors: Mapping[str, Any]) -> None:
    for name, pts in sorted(spent.items()):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="s", color=colors.get(name, "black"), label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("privacy spent: cumulative epsilon")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if "all sites (client level)" in spent:
        ax.legend(fontsize=7, frameon=False)
