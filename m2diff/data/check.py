"""``m2diff check data=DIR``: validate site folders, one line per problem, exit 1 when unusable.

This is the edge where Problem values become printed lines and an exit status.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from os import PathLike
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from m2diff.config import ConfigError, resolve_path
from m2diff.data.layout import DIAGNOSES, Problem, Site
from m2diff.data.validate import validate_site


def site_paths(value: object) -> list[Path]:
    """Folders of ``data.path``: one string / path or a list of them. Raises ConfigError."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError("no site folder given: use data=DIR or data.path=[DIR1,DIR2]")
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not items:
        raise ConfigError("data.path is an empty list: give at least one site folder")
    paths: list[Path] = []
    for item in items:
        if isinstance(item, int | float) and not isinstance(item, bool):
            item = str(item)  # Hydra reads data=2024 as a number; it is a folder name
        if not isinstance(item, str | PathLike) or not str(item).strip():
            raise ConfigError(f"data.path entry {item!r} is not a folder path")
        paths.append(resolve_path(item))
    return paths


def check_sites(paths: Iterable[str | PathLike], require_sd: bool = True,
                require_t1: bool = True) -> tuple[list[Site], list[Problem]]:
    """Validate each site folder; return the sites (usable subjects only) and all problems."""
    checked = _check_each(paths, require_sd, require_t1)
    return [s for s, _ in checked], [p for _, found in checked for p in found]


def _check_each(paths: Iterable[str | PathLike], require_sd: bool,
                require_t1: bool) -> list[tuple[Site, list[Problem]]]:
    return [validate_site(Path(p), require_sd=require_sd, require_t1=require_t1) for p in paths]


def summary_line(site: Site, problems: Sequence[Problem]) -> str:
    """``site-a (/abs/path): 4 usable subjects (CN 2, AD 2), 1 problem``: counts only.

    ``problems`` are this site's problems.
    """
    n = len(site.subjects)
    cohorts = ", ".join(f"{d} {len(site.cohort(d))}" for d in DIAGNOSES)
    mri_free = sum(s.t1 is None for s in site.subjects)
    no_sd = sum(s.sd is None for s in site.subjects)
    extras = "".join([f", {mri_free} without T1" if mri_free else "",
                      f", {no_sd} without standard-dose PET" if no_sd else ""])
    k = len(problems)
    return (f"{site.name} ({site.root}): {n} usable subject{'s' * (n != 1)} ({cohorts}{extras}), "
            f"{k} problem{'s' * (k != 1)}")


def prepare_hint(site: Site, problems: Sequence[Problem]) -> str | None:
    """A line pointing to ``m2diff prepare`` when volumes of a subject lie on different grids."""
    loose = sorted({p.subject for p in problems if p.subject and "not co-registered" in p.message})
    if not loose:
        return None
    return (f"hint: {site.name}: {len(loose)} subject(s) have T1 and PET on different grids; "
            "`m2diff prepare src=EXPORT_DIR out=SITE_DIR` registers the T1 to the PET and "
            "resamples every volume onto the PET's grid (README: Site data)")


def run_check(cfg: DictConfig, args: dict[str, str]) -> int:
    """CLI entry: problems to stderr, one summary line per site to stdout.

    Exit status 0 when every site has usable subjects, 1 when some site has none.
    ``data.require_sd`` / ``data.require_t1`` (default true) waive the SD PET / the T1.
    """
    data = cfg.get("data", {})
    paths = site_paths(data.get("path"))
    checked = _check_each(paths, require_sd=bool(data.get("require_sd", True)),
                          require_t1=bool(data.get("require_t1", True)))
    for _, problems in checked:
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
    for site, problems in checked:
        hint = prepare_hint(site, problems)
        if hint:
            print(hint, file=sys.stderr)
    for site, problems in checked:
        print(summary_line(site, problems))
    unusable = [s.name for s, _ in checked if not s.subjects]
    if unusable:
        print(f"m2diff check: no usable subjects at {', '.join(unusable)}", file=sys.stderr)
        return 1
    return 0
