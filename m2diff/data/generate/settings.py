"""The generator's settings (conf/generate/*.yaml) as checked, plain, picklable values.

Site heterogeneity is decided here, once: ``read_settings`` turns the configured profiles
into one resolved ``SiteProfile`` per generated site (profiles cycled up to
``generate.sites``), after the federation-wide knobs of conf/generate/default.yaml:

- ``dose`` / ``psf_mm`` / ``t1_contrast`` / ``ad_fraction``: a number replaces every site's
  own value (e.g. ``generate.dose=0.05`` makes the dose homogeneous), null keeps them;
- ``label_skew`` in [0, 1]: 1 keeps each site's AD fraction, 0 gives every site the
  federation's subject-weighted mean (IID labels), values between mix the two linearly;
- a profile's own ``subjects`` (site size) wins over ``generate.subjects``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from m2diff.config import ConfigError


@dataclass(frozen=True)
class SiteProfile:
    """What makes a site different: cohort mix, dose, scanner resolution, MRI contrast.

    ``ad_fraction`` in [0, 1]; ``dose`` in (0, 1] (fraction of the standard dose of the LD
    scan); ``psf_mm`` FWHM of the scanner's Gaussian point-spread function in mm;
    ``t1_contrast`` > 0, the exponent of the T1 intensity curve (1 = template contrast);
    ``subjects`` >= 1, the site's number of subjects.
    """

    name: str
    ad_fraction: float
    dose: float
    psf_mm: float
    t1_contrast: float
    subjects: int = 8


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
    site_profiles: tuple[SiteProfile, ...]  # one per site (``sites`` entries), knobs applied


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


# Profile key -> (bounds, kind); the same bounds hold for the federation-wide knob of that name.
_PROFILE_KEYS: dict[str, tuple[float, float | None, type]] = {
    "ad_fraction": (0.0, 1.0, float), "dose": (1e-4, 1.0, float),
    "psf_mm": (0.0, 30.0, float), "t1_contrast": (0.1, 10.0, float),
    "subjects": (1, None, int)}
KNOBS = ("dose", "psf_mm", "t1_contrast", "ad_fraction")  # generate.<knob>: one value for every site


def _profile(raw: Mapping[str, Any], index: int, gen_cfg: Mapping[str, Any]) -> SiteProfile:
    where = f"generate.site_profiles[{index}]"
    name = str(raw.get("name") or f"site-{index + 1}")
    if "/" in name or name.startswith("."):
        raise ConfigError(f"{where}.name must be a plain folder name, got {name!r}")
    values: dict[str, Any] = {}
    for key, (low, high, kind) in _PROFILE_KEYS.items():
        if key in KNOBS and gen_cfg.get(key) is not None:
            values[key] = _number(gen_cfg, key, kind, low, high)  # the federation-wide knob
        elif key == "subjects" and raw.get("subjects") is None:
            values[key] = _number(gen_cfg, "subjects", int, 1)
        else:
            values[key] = _number(raw, key, kind, low, high, where)
    return SiteProfile(name=name, **values)


def site_profiles(gen_cfg: Mapping[str, Any], sites: int) -> tuple[SiteProfile, ...]:
    """One resolved profile per site: configured profiles cycled up to ``sites``, the
    federation-wide knobs applied, then ``label_skew`` (see the module doc)."""
    raw = list(gen_cfg.get("site_profiles") or [])
    if not raw:
        raise ConfigError("generate.site_profiles must list at least one site profile")
    profiles = [_profile(p, i, gen_cfg) for i, p in enumerate(raw)]
    chosen = [profiles[i % len(profiles)] for i in range(sites)]
    skew = 1.0 if gen_cfg.get("label_skew") is None else _number(gen_cfg, "label_skew", float, 0.0, 1.0)
    if skew < 1.0:
        weight = sum(p.subjects for p in chosen)
        mean = sum(p.ad_fraction * p.subjects for p in chosen) / weight
        chosen = [replace(p, ad_fraction=mean + skew * (p.ad_fraction - mean)) for p in chosen]
    return tuple(chosen)


def read_settings(gen_cfg: Mapping[str, Any]) -> Settings:
    """Check ``cfg.generate``; raise ConfigError naming the first bad key."""
    shape = _numbers(gen_cfg, "shape", 3, int)
    if min(shape) < 1 or shape[0] < 8 or shape[0] != shape[1]:
        raise ConfigError(f"generate.shape must be [N, N, Z] with N >= 8 (square axial slices), got {list(shape)}")
    z_mm = _numbers(gen_cfg, "z_mm", 2, float)
    if z_mm[1] < z_mm[0]:
        raise ConfigError(f"generate.z_mm must be [lowest, highest] slice centre in mm, got {list(z_mm)}")
    sites = _number(gen_cfg, "sites", int, 1)
    return Settings(
        sites=sites,
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
        site_profiles=site_profiles(gen_cfg, sites),
    )
