"""Evaluation on held-out subjects: per subject, then per cohort / site / pooled (docs/METHOD.md section 6).

``m2diff evaluate data=SITE_DIR [checkpoint=...] [split=test]`` writes, under ``cfg.out``:
metrics_subjects.csv (one row per subject and method, the LD input first), metrics_summary.csv
(mean and std per method x cohort x site and pooled), metrics.json (protocol, rows, summary),
panel_<cohort>.png (T1 / LD / enhanced / SD / |error| for up to 3 subjects) and panel.png
(the same for the first CN and the first AD subject).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from m2diff.data.layout import Site, Subject
from m2diff.enhance import enhance_volume, load_for_inference, one_line, run_device, voxel_size
from m2diff.metrics import PROTOCOL, volume_metrics
from m2diff.regions import ad_mask

LD_METHOD = "LD input"
COHORTS = ("CN", "AD")
METRICS = ("psnr", "ssim", "nmse", "suvr_bias_pct")
TABLE_COLUMNS = ("site", "method", "n", "psnr", "ssim", "nmse", "suvr_bias_pct")
POOLED = "pooled"
PANEL_ROWS = 3


def ad_slice(shape: Sequence[int], affine: np.ndarray, mask: np.ndarray | None = None) -> int:
    """Axial index with the most AD-region voxels (inside ``mask`` if given); mid slice if none."""
    region = ad_mask(tuple(shape), affine)
    if mask is not None:
        region = region & mask
    counts = region.sum(axis=(0, 1))
    return int(np.argmax(counts)) if counts.max() > 0 else int(shape[2]) // 2


def evaluate_subjects(model: torch.nn.Module | None, cfg: DictConfig, site: Site | str,
                      subjects: Iterable[Subject], device: torch.device | str = "cpu",
                      name: str | None = None,
                      keep: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Metrics of the LD input and (if ``model``) the enhanced volume for each subject.

    Rows: site, subject, diagnosis, method, psnr (dB), ssim, nmse, suvr_bias_pct (%), plus
    suvr_bias_<region> and, for the model, seconds (sampling time of the volume). The LD input
    row of a subject always comes before its model row. ``name`` defaults to
    ``cfg.model.arch``. ``keep`` (optional) receives, per subject, the axial slice through
    the AD regions of t1 / ld / pred / sd (2D arrays) for figures, keyed "site/subject".
    """
    from m2diff.data.mask import brain_mask
    from m2diff.data.nifti import load_volume

    site_name = site.name if isinstance(site, Site) else str(site)
    method = name or str(cfg.model.arch)
    rows: list[dict[str, Any]] = []
    for subject in subjects:
        if subject.sd is None:
            raise ValueError(f"{site_name}/{subject.id}: no standard-dose PET to evaluate against")
        ld = load_volume(subject.ld)
        sd = load_volume(subject.sd).data
        t1 = load_volume(subject.t1).data if subject.t1 is not None else None
        mask = brain_mask(sd)
        base = {"site": site_name, "subject": subject.id, "diagnosis": subject.diagnosis}
        rows.append({**base, "method": LD_METHOD, **volume_metrics(ld.data, sd, mask, ld.affine)})
        pred = None
        if model is not None:
            start = time.perf_counter()
            pred, _ = enhance_volume(model, cfg, ld.data, t1, device, seed=int(cfg.seed),
                                     voxel_mm=voxel_size(ld.affine))
            seconds = time.perf_counter() - start
            rows.append({**base, "method": method, **volume_metrics(pred, sd, mask, ld.affine),
                         "seconds": seconds})
        if keep is not None:
            z = ad_slice(sd.shape, ld.affine, mask)
            keep[f"{site_name}/{subject.id}"] = {  # ids repeat across sites
                "label": f"{subject.id} ({subject.diagnosis})", "diagnosis": subject.diagnosis,
                "site": site_name, "t1": None if t1 is None else t1[:, :, z],
                "ld": ld.data[:, :, z], "pred": None if pred is None else pred[:, :, z],
                "sd": sd[:, :, z],
            }
    return rows


def _stats(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    arr = np.asarray(finite, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def _methods(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Methods in first-seen order with the LD input first."""
    seen = list(dict.fromkeys(str(r["method"]) for r in rows))
    return sorted(seen, key=lambda m: m != LD_METHOD)


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (ddof=1; NaN for n=1) per method x site x cohort (CN, AD, all), and pooled
    over sites (site = "pooled"). Rows: method, site, cohort, n, <metric>, <metric>_std.
    Empty groups are left out. Order: cohort, site (pooled last), method (LD input first)."""
    sites = list(dict.fromkeys(str(r["site"]) for r in rows))
    out: list[dict[str, Any]] = []
    for cohort in (*COHORTS, "all"):
        for site in (*sites, POOLED):
            for method in _methods(rows):
                group = [r for r in rows if r["method"] == method
                         and (site == POOLED or r["site"] == site)
                         and (cohort == "all" or r["diagnosis"] == cohort)]
                if not group:
                    continue
                item: dict[str, Any] = {"method": method, "site": site, "cohort": cohort,
                                        "n": len(group)}
                keys = [k for k in group[0] if k in METRICS or k.startswith("suvr_bias_")
                        or k == "seconds"]
                for key in keys:
                    item[key], item[f"{key}_std"] = _stats([r.get(key, math.nan) for r in group])
                out.append(item)
    return out


def site_metrics(rows: Sequence[Mapping[str, Any]], method: str | None = None) -> dict[str, float]:
    """Flat metrics of one site for a federated client; identical keys for every site.

    Keys: ``{cohort}_n`` and ``{cohort}_{psnr,ssim,nmse,suvr_bias}`` for cohort in cn, ad,
    all (the model ``method``, default the first non-LD method in ``rows``), and
    ``ld_{cohort}_{psnr,ssim,nmse,suvr_bias}`` for the LD input. A cohort without subjects
    has n = 0 and 0.0 values; non-finite means (e.g. PSNR of a perfect prediction) become 0.0.
    Numbers only: no ids, no names.
    """
    if method is None:
        others = [m for m in _methods(rows) if m != LD_METHOD]
        method = others[0] if others else LD_METHOD
    out: dict[str, float] = {}
    for prefix, meth in (("", method), ("ld_", LD_METHOD)):
        for cohort in ("cn", "ad", "all"):
            group = [r for r in rows if r["method"] == meth
                     and (cohort == "all" or str(r["diagnosis"]).lower() == cohort)]
            if not prefix:
                out[f"{cohort}_n"] = float(len(group))
            for key in METRICS:
                mean, _ = _stats([r.get(key, math.nan) for r in group])
                short = "suvr_bias" if key == "suvr_bias_pct" else key
                out[f"{prefix}{cohort}_{short}"] = mean if math.isfinite(mean) else 0.0
    return out


def print_report(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]],
                 split: str) -> None:
    """Protocol header, then one rich table per cohort (and all), the LD input first."""
    from rich.console import Console

    from m2diff.report import print_table

    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    console.print(f"[bold]Evaluation[/bold] on the '{split}' split. Protocol: {PROTOCOL}")
    one_site = len({s["site"] for s in summary}) <= 2  # a site and its identical "pooled"
    for cohort in (*COHORTS, "all"):
        group = [s for s in summary if s["cohort"] == cohort
                 and not (one_site and s["site"] == POOLED)]
        if group:
            label = {"CN": "CN (healthy)", "AD": "AD", "all": "all subjects"}[cohort]
            print_table(group, f"{label}: mean ± std per subject", TABLE_COLUMNS, console=console)


def run_evaluate(cfg: DictConfig, args: dict[str, str]) -> int:
    """CLI entry (see module docstring). Exit status 0, or 1 when nothing can be evaluated."""
    from m2diff.config import resolve_path
    from m2diff.data.check import site_paths
    from m2diff.data.splits import split_subjects
    from m2diff.data.validate import validate_site
    from m2diff.report import plot_panel, write_csv, write_json

    split = args.get("split", "test")
    if split not in ("train", "val", "test", "all"):
        print(f"m2diff evaluate: split={split} is not one of test, val, train, all", file=sys.stderr)
        return 2
    device = run_device(cfg)
    model = None
    if args.get("checkpoint"):
        try:
            model, cfg = load_for_inference(cfg, args["checkpoint"], device)
        except Exception as exc:  # CheckpointError, or anything a damaged file raises
            print(f"m2diff evaluate: {one_line(exc, args['checkpoint'])}", file=sys.stderr)
            return 2
    rows: list[dict[str, Any]] = []
    keep: dict[str, dict[str, Any]] = {}
    for root in site_paths(cfg.data.get("path")):
        site, problems = validate_site(root, require_sd=True)
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        chosen = site.subjects if split == "all" else \
            split_subjects(site.subjects, list(cfg.data.split), int(cfg.seed))[split]
        if not chosen:
            print(f"m2diff evaluate: {site.name}: no usable subject in split '{split}'",
                  file=sys.stderr)
            continue
        rows += evaluate_subjects(model, cfg, site, chosen, device, keep=keep)
    if not rows:
        print("m2diff evaluate: nothing to evaluate", file=sys.stderr)
        return 1
    summary = summarise(rows)
    print_report(rows, summary, split)
    out = resolve_path(cfg.out)
    write_csv(out / "metrics_subjects.csv", rows)
    write_csv(out / "metrics_summary.csv", summary)
    write_json(out / "metrics.json", {"protocol": PROTOCOL, "split": split,
                                      "checkpoint": args.get("checkpoint"),
                                      "subjects": rows, "summary": summary})
    method = None if model is None else str(cfg.model.arch)
    for c in keep.values():
        c["label"] = f"{c['site']}\n{c['label']}"
    for cohort in COHORTS:
        cases = [c for c in keep.values() if c["diagnosis"] == cohort][:PANEL_ROWS]
        if cases:
            plot_panel(cases, out / f"panel_{cohort.lower()}.png",
                       title=f"{cohort}: {method or 'LD input only'}, axial slice through the AD regions")
    first = [c for c in (next((c for c in keep.values() if c["diagnosis"] == d), None)
                         for d in COHORTS) if c is not None]
    plot_panel(first, out / "panel.png",
               title=f"{method or 'LD input only'}: one CN and one AD subject, axial slice through "
                     "the AD regions")
    print(f"wrote {out}/metrics_subjects.csv, metrics_summary.csv, metrics.json, panel_*.png")
    return 0
