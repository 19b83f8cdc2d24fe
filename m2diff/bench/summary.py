"""Gather the bench's runs into one table, answer its questions, write CSV and markdown.

Rows (``summary_rows``): one per setting x site x cohort x method, method being the LD input
(the baseline every model has to beat), ``federated``, ``centralized`` or ``local``; columns
n (held-out subjects), PSNR dB, SSIM, NMSE, SUVR bias %, epsilon (where private), the run's
wall time and folder. Cohorts without held-out subjects are left out.

Answers (``answers``), per setting: PSNR of every method pooled over all held-out subjects
(the sites' ALL rows weighted by their n), federated minus centralised, and federated minus
local at the smallest site(s) (fewest subjects; the mean over ties), with the issue's
thresholds: federated no more than 0.3 dB below centralised, at least 1 dB above local-only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from m2diff.fedutil import table_rows
from m2diff.report import _atomic_write, markdown_table, write_csv

METHODS = ("federated", "centralized", "local")
LD = "LD input"
METRICS = ("psnr", "ssim", "nmse", "suvr_bias_pct")
WITHIN_DB = 0.3  # "is federated within 0.3 dB of centralised?"
ABOVE_DB = 1.0  # "... and >= 1 dB above local-only at the smallest site?"


def compare_rows(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Round rows per method (``{"federated": rows, ...}``, m2diff.fedutil.metric_rows) ->
    table rows per site and cohort: the LD input once, then each method (``table_rows`` keys)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for method, rows in results.items():
        for row in table_rows(rows, method):
            key = (str(row["site"]), str(row["cohort"]))
            group = groups.setdefault(key, [])
            if row["method"] == LD:
                if not any(r["method"] == LD for r in group):
                    group.insert(0, row)
            else:
                group.append(row)
    order = {"CN": 0, "AD": 1, "ALL": 2}
    return [row for key in sorted(groups, key=lambda k: (k[0], order.get(k[1], 3)))
            for row in groups[key]]


def write_compare(out: Path, table: Sequence[Mapping[str, Any]]) -> None:
    """``compare.csv`` and ``compare.md`` of a ``compare_rows`` table (atomic writes)."""
    from m2diff.fedutil import table_columns

    columns = table_columns(table)
    write_csv(out / "compare.csv", table, columns)
    text = markdown_table(table, columns) + "\n"
    _atomic_write(out / "compare.md", lambda fh: fh.write(text))


def summary_rows(settings: Sequence[Any], results: Mapping[str, Mapping[str, Any]]
                 ) -> list[dict[str, Any]]:
    """``settings``: m2diff.bench.sweep.Setting list; ``results``: run identity -> its
    ``run.json`` (``rows``, ``wall_s``, ``sites``). Long table, see the module doc."""
    out: list[dict[str, Any]] = []
    for setting in settings:
        by_method: dict[str, list[dict[str, Any]]] = {}
        wall: dict[str, float] = {}
        folder: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for method, run in setting.runs.items():
            result = results.get(run.identity) or {}
            if result.get("status") != "done":
                continue
            by_method[method] = list(result.get("rows") or [])
            wall[method] = float(result.get("wall_s", float("nan")))
            folder[method] = run.name
            sizes.update({k: int(v) for k, v in (result.get("sites") or {}).items()})
        for row in compare_rows({m: by_method[m] for m in METHODS if m in by_method}):
            method = str(row["method"])
            out.append({"setting": setting.label, "site": row["site"],
                        "subjects": sizes.get(str(row["site"])), "cohort": row["cohort"],
                        "n": row["n"], "method": method,
                        **{k: row.get(k) for k in METRICS}, "epsilon": row.get("epsilon"),
                        "wall_s": wall.get(method), "run": folder.get(method, "")})
    return out


def _pooled(rows: Sequence[Mapping[str, Any]], method: str, key: str = "psnr") -> float | None:
    """Subject-weighted mean of ``key`` over the sites' ALL rows of one method."""
    items = [(int(r["n"]), float(r[key])) for r in rows
             if r["method"] == method and r["cohort"] == "ALL" and r.get(key) is not None]
    total = sum(n for n, _ in items)
    return sum(n * v for n, v in items) / total if total else None


def _site_psnr(rows: Sequence[Mapping[str, Any]], site: str, method: str) -> float | None:
    for r in rows:
        if r["site"] == site and r["method"] == method and r["cohort"] == "ALL":
            return None if r.get("psnr") is None else float(r["psnr"])
    return None


def answers(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per setting: pooled PSNR per method, federated - centralised, federated - local at
    the smallest site(s), and whether the issue's thresholds hold (None: not measurable)."""
    out = []
    for label in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == label]
        pooled = {m: _pooled(mine, m) for m in (LD, *METHODS)}
        sizes = {r["site"]: r["subjects"] for r in mine if r.get("subjects") is not None}
        smallest = sorted(s for s, n in sizes.items() if n == min(sizes.values())) if sizes else []
        gaps = [f - loc for s in smallest
                if (f := _site_psnr(mine, s, "federated")) is not None
                and (loc := _site_psnr(mine, s, "local")) is not None]
        fed, cen = pooled["federated"], pooled["centralized"]
        vs_cen = None if fed is None or cen is None else fed - cen
        vs_local = sum(gaps) / len(gaps) if gaps else None
        eps = [float(r["epsilon"]) for r in mine if r["method"] == "federated" and r.get("epsilon") is not None]
        out.append({
            "setting": label,
            **{f"psnr_{'ld' if m == LD else m}": v for m, v in pooled.items()},
            "fed_minus_central": vs_cen,
            "within_0.3dB": None if vs_cen is None else vs_cen >= -WITHIN_DB,
            "smallest_sites": ",".join(smallest),
            "smallest_subjects": min(sizes.values()) if sizes else None,
            "fed_minus_local_smallest": vs_local,
            "above_1dB": None if vs_local is None else vs_local >= ABOVE_DB,
            "epsilon": max(eps) if eps else None,
        })
    return out


ANSWER_HEADERS = {
    "setting": "setting", "psnr_ld": "LD input dB", "psnr_federated": "federated dB",
    "psnr_centralized": "centralised dB", "psnr_local": "local dB",
    "fed_minus_central": "fed - central dB", "within_0.3dB": "within 0.3 dB",
    "smallest_sites": "smallest site(s)", "smallest_subjects": "subjects",
    "fed_minus_local_smallest": "fed - local dB (smallest)", "above_1dB": ">= 1 dB",
    "epsilon": "epsilon (federated)",
}
SUMMARY_COLUMNS = ("setting", "site", "subjects", "cohort", "n", "method", *METRICS,
                   "epsilon", "wall_s", "run")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:+.2f}" if abs(value) < 100 and value < 0 else f"{value:.2f}"
    return str(value)


def answers_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    """The answers as a markdown table (signed differences, yes/no, '-' for not measured)."""
    keys = list(ANSWER_HEADERS)
    lines = ["| " + " | ".join(ANSWER_HEADERS[k] for k in keys) + " |",
             "|" + "|".join("---" if k in ("setting", "smallest_sites") else "---:" for k in keys) + "|"]
    for row in table:
        cells = []
        for k in keys:
            v = row.get(k)
            cells.append(f"{v:+.2f}" if k.startswith("fed_minus") and v is not None else _cell(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def psnr_markdown(rows: Sequence[Mapping[str, Any]], cohort: str = "ALL") -> str:
    """One line per setting and site: held-out PSNR of the LD input and of each method."""
    lines = ["| setting | site | subjects | n | LD input dB | federated dB | centralised dB | local dB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    keyed: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r["cohort"] != cohort:
            continue
        entry = keyed.setdefault((r["setting"], r["site"]), {"subjects": r.get("subjects"), "n": r["n"]})
        entry[r["method"]] = r.get("psnr")
    for (label, site), e in keyed.items():
        vals = [_cell(None if e.get(m) is None else float(e[m])) for m in (LD, *METHODS)]
        lines.append(f"| {label} | {site} | {_cell(e['subjects'])} | {e['n']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_summary(out: Path, rows: Sequence[Mapping[str, Any]],
                  table: Sequence[Mapping[str, Any]], header: str) -> None:
    """``summary.csv`` (long rows), ``answers.csv`` and ``summary.md`` under ``out``."""
    write_csv(out / "summary.csv", rows, SUMMARY_COLUMNS)
    write_csv(out / "answers.csv", table, list(ANSWER_HEADERS))
    text = "\n\n".join([
        header,
        "## Answers: federated vs centralised (pooled over sites) and vs local-only at the smallest site",
        answers_markdown(table),
        "## Held-out PSNR per site (ALL subjects of the site)",
        psnr_markdown(rows),
        "## Every setting x site x cohort x method",
        markdown_table(rows, SUMMARY_COLUMNS),
    ]) + "\n"
    _atomic_write(out / "summary.md", lambda fh: fh.write(text))
