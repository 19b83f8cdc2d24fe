"""The generator's settings (conf/generate/*.yaml) as checked, plain, picklable values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from m2diff.config import ConfigError


@dataclass(frozen=True)
class SiteProfile:
    """What makes a site different: cohort mix, dose, scanner resolution, MRI contrast.

    ``ad_fraction`` in [0, 1]; ``dose`` in (0, 1] (fraction of the standard dose of the LD
    scan); ``psf_mm`` FWHM of the scanner's Gaussian point-spread function in mm;
    ``t1_contrast`` > 0, the exponent of the T1 intensity curve (1 = template contrast).
    """

    name: str
    ad_fraction: float
    dose: float
    psf_mm: float
    t1_contrast: float


@dataclass(frozen=True)
class Settings:
    """Everything the simulator reads from ``cfg.generate``; see conf/generate/default.yaml."""

    sites: int
    subjects: int
    shape: tuple[int, int, int]
    fov_mm: float
    center_mm: tuple[float, float]
    z_mm: tuple[float, float]
    angles: int
    counts: float
    mlem_iters: int
    post_filter_mm: float
    workers: int
    site_profiles: tuple[SiteProfile, ...]


def _number(cfg: Mapping[str, Any], key: str, kind: type, low: float | None = None,
            high: float | None = None, where: str = "generate") -> Any:
    value = cfg.get(key)
    try:
        number = kind(value)
        if isinstance(value, bool) or (kind is int and float(value) != number):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{key} must be a{'n integer' if kind is int else ' number'}, got {value!r}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{where}.{key} must be {bounds}, got {value!r}")
    return number


def _numbers(cfg: Mapping[str, Any], key: str, n: int, kind: type) -> tuple:
    value = cfg.get(key)
    try:
        items = tuple(kind(v) for v in value)
        if len(items) != n:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"generate.{key} must be a list of {n} numbers, got {value!r}") from None
    return items


def _profile(raw: Mapping[str, Any], index: int) -> SiteProfile:
    where = f"generate.site_profiles[{index}]"
    name = str(raw.get("name") or f"site-{index + 1}")
    if "/" in name or name.startswith("."):
        raise ConfigError(f"{where}.name must be a plain folder name, got {name!r}")
    return SiteProfile(
        name=name,
        ad_fraction=_number(raw, "ad_fraction", float, 0.0, 1.0, where),
        dose=_number(raw, "dose", float, 1e-4, 1.0, where),
        psf_mm=_number(raw, "psf_mm", float, 0.0, 30.0, where),
        t1_contrast=_number(raw, "t1_contrast", float, 0.1, 10.0, where),
    )


def read_settings(gen_cfg: Mapping[str, Any]) -> Settings:
    """Check ``cfg.generate``; raise ConfigError naming the first bad key."""
    shape = _numbers(gen_cfg, "shape", 3, int)
    if min(shape) < 1 or shape[0] < 8 or shape[0] != shape[1]:
        raise ConfigError(f"generate.shape must be [N, N, Z] with N >= 8 (square axial slices), got {list(shape)}")
    profiles = gen_cfg.get("site_profiles") or []
    if not profiles:
        raise ConfigError("generate.site_profiles must list at least one site profile")
    z_mm = _numbers(gen_cfg, "z_mm", 2, float)
    if z_mm[1] < z_mm[0]:
        raise ConfigError(f"generate.z_mm must be [lowest, highest] slice centre in mm, got {list(z_mm)}")
    return Settings(
        sites=_number(gen_cfg, "sites", int, 1),
        subjects=_number(gen_cfg, "subjects", int, 1),
        shape=shape,
        fov_mm=_number(gen_cfg, "fov_mm", float, 50.0, 400.0),
        center_mm=_numbers(gen_cfg, "center_mm", 2, float),
        z_mm=z_mm,
        angles=_number(gen_cfg, "angles", int, 4),
        counts=_number(gen_cfg, "counts", float, 1.0),
        mlem_iters=_number(gen_cfg, "mlem_iters", int, 1),
        post_filter_mm=_number(gen_cfg, "post_filter_mm", float, 0.0, 30.0),
        workers=_number(gen_cfg, "workers", int, 1),
        site_profiles=tuple(_profile(p, i) for i, p in enumerate(profiles)),
    )
