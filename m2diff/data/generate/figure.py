"""``m2diff figure``: one PNG showing a CN and an AD subject as T1 / LD PET / SD PET.

Rows are subjects, columns modalities, each panel the axial slice through the most AD-region
voxels (m2diff.regions), drawn with x left-right and anterior up. LD and SD of a subject
share one PET colour scale so the noise difference is visible. No colorbars.
"""

from __future__ import annotations

import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig

from m2diff.config import ConfigError, resolve_path
from m2diff.data.layout import PARTICIPANTS, ld_path, sd_path, t1_path
from m2diff.data.nifti import load_volume
from m2diff.regions import ad_mask


@dataclass(frozen=True)
class Pick:
    """A subject chosen for the figure."""

    site: Path
    subject_id: str
    diagnosis: str


def site_folders(paths: list[Path]) -> list[Path]:
    """Site folders among ``paths``: each path is a site (has participants.tsv) or holds sites."""
    sites = []
    for path in paths:
        if (path / PARTICIPANTS).is_file():
            sites.append(path)
        elif path.is_dir():
            sites += sorted(p for p in path.iterdir() if (p / PARTICIPANTS).is_file())
    return sites


def pick_subjects(sites: list[Path]) -> dict[str, Pick]:
    """The first CN and the first AD subject (with T1, LD and SD on disk) across ``sites``."""
    picks: dict[str, Pick] = {}
    for site in sites:
        with open(site / PARTICIPANTS, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                sid, dx = row.get("participant_id", ""), row.get("diagnosis", "")
                if dx in ("CN", "AD") and dx not in picks and all(
                        p.is_file() for p in (t1_path(site, sid), ld_path(site, sid), sd_path(site, sid))):
                    picks[dx] = Pick(site, sid, dx)
    return picks


def _as_paths(value) -> list[Path]:
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    return [p for p in (resolve_path(v) for v in values) if p is not None]


def ad_slice(shape: tuple[int, int, int], affine: np.ndarray) -> int:
    """Index of the axial slice holding the most AD-region voxels."""
    return int(np.argmax(ad_mask(shape, affine).sum(axis=(0, 1))))


def _dose_note(header) -> str:
    """' (5% dose)' from the description m2diff generate writes, else ''."""
    match = re.search(r"dose ([0-9.eE+-]+)\)", bytes(header["descrip"]).decode(errors="ignore"))
    try:
        return f" ({float(match.group(1)):.0%} dose)" if match else ""
    except ValueError:
        return ""


def draw_figure(picks: list[Pick], png: Path) -> Path:
    """Render rows = ``picks``, columns = T1 / LD / SD, to ``png`` atomically."""
    import matplotlib

    from m2diff.report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(picks), 3, figsize=(7.5, 2.6 * len(picks)), squeeze=False)
    for row, pick in zip(axes, picks, strict=True):
        t1, ld, sd = (load_volume(f(pick.site, pick.subject_id))
                      for f in (t1_path, ld_path, sd_path))
        z = ad_slice(sd.data.shape, sd.affine)
        vmax = float(np.percentile(sd.data, 99.8)) or 1.0
        panels = [(t1.data, "gray", float(np.percentile(t1.data, 99.8)) or 1.0, "T1w"),
                  (ld.data, "inferno", vmax, f"LD PET{_dose_note(ld.header)}"),
                  (sd.data, "inferno", vmax, "SD PET")]
        for ax, (data, cmap, top, title) in zip(row, panels, strict=True):
            ax.imshow(data[:, :, z].T, origin="lower", cmap=cmap, vmin=0.0, vmax=top,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if ax is row[0]:
                ax.set_ylabel(f"{pick.diagnosis}\n{pick.site.name}/{pick.subject_id}", fontsize=8)
            ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, png, dpi=120)


def run_data_figure(cfg: DictConfig, args: dict[str, str]) -> int:
    """``m2diff figure data=DIR [out=DIR] [png=PATH]``: writes the PNG, prints its path."""
    paths = _as_paths(cfg.data.get("path"))
    if not paths:
        raise ConfigError("m2diff figure needs data=DIR (a site folder, or a folder of sites)")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"no such folder: {', '.join(missing)}")
    sites = site_folders(paths)
    if not sites:
        raise ConfigError(f"no site folder (with {PARTICIPANTS}) in {', '.join(map(str, paths))}")
    picks = pick_subjects(sites)
    if not picks:
        raise ConfigError("no CN or AD subject with T1, LD and SD files found")
    png = resolve_path(args.get("png")) or resolve_path(cfg.get("out")) / "subjects.png"
    try:
        draw_figure([picks[d] for d in ("CN", "AD") if d in picks], png)
    except OSError as exc:
        print(f"m2diff figure: cannot write {png}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    missing_dx = [d for d in ("CN", "AD") if d not in picks]
    note = f" (no {missing_dx[0]} subject found)" if missing_dx else ""
    print(f"wrote {png}{note}")
    return 0
