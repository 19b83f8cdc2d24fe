"""Site heterogeneity knobs of the generator and the realistic presets (settings level, and one
tiny generation through m2diff simulate's site reuse)."""

from __future__ import annotations

import csv

import pytest

from m2diff.config import ConfigError, compose
from m2diff.data.generate.settings import read_settings


def _settings(*words: str):
    return read_settings(compose(list(words)).generate)


def test_federation_wide_knobs_replace_every_sites_value():
    own = _settings("generate.sites=3")
    assert [p.dose for p in own.site_profiles] == [0.25, 0.05, 0.01]
    same = _settings("generate.sites=3", "generate.dose=0.05", "generate.psf_mm=5",
                     "generate.t1_contrast=1.0", "generate.ad_fraction=0.5")
    assert {(p.dose, p.psf_mm, p.t1_contrast, p.ad_fraction) for p in same.site_profiles} == {
        (0.05, 5.0, 1.0, 0.5)}
    assert [p.name for p in same.site_profiles] == [p.name for p in own.site_profiles]


def test_label_skew_moves_every_site_towards_the_subject_weighted_mean():
    skewed = _settings("generate=realistic")
    iid = _settings("generate=realistic", "generate.label_skew=0")
    half = _settings("generate=realistic", "generate.label_skew=0.5")
    n = [p.subjects for p in skewed.site_profiles]
    mean = sum(p.ad_fraction * k for p, k in zip(skewed.site_profiles, n, strict=True)) / sum(n)
    assert all(p.ad_fraction == pytest.approx(mean) for p in iid.site_profiles)
    for a, b, c in zip(skewed.site_profiles, half.site_profiles, iid.site_profiles, strict=True):
        assert b.ad_fraction == pytest.approx((a.ad_fraction + c.ad_fraction) / 2)


def test_realistic_presets_are_unequal_federations_of_16():
    for preset in ("realistic", "realistic_tiny"):
        s = _settings(f"generate={preset}")
        sizes = [p.subjects for p in s.site_profiles]
        assert len(sizes) == 16 == compose([f"generate={preset}"]).fl.sites
        assert min(sizes) == 3 and max(sizes) == 24 and sum(sizes) == 135
        assert len({p.dose for p in s.site_profiles}) >= 4
    assert _settings("generate=realistic_tiny").shape == (32, 32, 8)
    # more sites than profiles: cycled, every site keeps its profile's size
    assert [p.subjects for p in _settings("generate=realistic", "generate.sites=18").site_profiles][16:] == [24, 18]


@pytest.mark.parametrize("words, message", [
    (["generate.label_skew=1.5"], "generate.label_skew must be in"),
    (["generate.dose=0"], "generate.dose must be in"),
    (["generate.site_profiles=[{name: x, subjects: 0, ad_fraction: 0, dose: 0.1, psf_mm: 4, t1_contrast: 1}]"],
     r"site_profiles\[0\]\.subjects must be >= 1"),
])
def test_bad_knobs_name_the_key(words, message):
    with pytest.raises(ConfigError, match=message):
        _settings(*words)


def test_sites_of_unequal_size_with_iid_labels_and_no_reuse_of_other_settings(tmp_path):
    from m2diff.simulate import ensure_sites

    profiles = ("[{name: big, subjects: 4, ad_fraction: 1.0, dose: 0.1, psf_mm: 4, t1_contrast: 1},"
                "{name: small, subjects: 2, ad_fraction: 0.0, dose: 0.1, psf_mm: 4, t1_contrast: 1}]")
    words = ["generate=tiny", f"generate.out={tmp_path / 'sim'}", "generate.sites=2",
             f"generate.site_profiles={profiles}", "generate.label_skew=0", "generate.workers=1"]
    cfg = compose(words)
    sites = ensure_sites(cfg)
    rows = {}
    for site in sites:
        with open(site / "participants.tsv", newline="") as fh:
            rows[site.name] = [r["diagnosis"] for r in csv.DictReader(fh, delimiter="\t")]
    # mean AD fraction (4 * 1 + 2 * 0) / 6 = 2/3 at both sites
    assert {k: (len(v), v.count("AD")) for k, v in rows.items()} == {"big": (4, 3), "small": (2, 1)}
    assert ensure_sites(cfg) == sites  # same settings: reused
    with pytest.raises(ConfigError, match="generated with other generate"):
        ensure_sites(compose([*words[:-2], "generate.label_skew=1"]))
