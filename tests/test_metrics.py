"""Metrics against hand-computed values on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m2diff import metrics
from m2diff.regions import AD_REGIONS, REFERENCE_REGION, ad_mask, region_mask


def _ramp(shape=(16, 16, 4)) -> np.ndarray:
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return x / x.max() * 10.0  # range 10


def test_psnr_constant_offset():
    ref = _ramp()
    mask = np.ones(ref.shape, bool)
    # MSE = 0.5^2, range 10: PSNR = 20 log10(10 / 0.5)
    assert metrics.psnr(ref + 0.5, ref, mask) == pytest.approx(20 * math.log10(20.0), abs=1e-4)
    assert metrics.psnr(ref, ref, mask) == math.inf


def test_psnr_counts_only_the_mask():
    ref = _ramp()
    mask = np.zeros(ref.shape, bool)
    mask[4:12, 4:12] = True
    pred = ref.copy()
    pred[~mask] += 100.0  # outside the brain: ignored
    pred[mask] += 1.0
    assert metrics.psnr(pred, ref, mask) == pytest.approx(20 * math.log10(10.0), abs=1e-4)


def test_nmse_of_scaled_image():
    ref = _ramp() + 1.0
    mask = ref > 3.0
    # ||1.1 r - r||^2 / ||r||^2 = 0.01
    assert metrics.nmse(1.1 * ref, ref, mask) == pytest.approx(0.01, rel=1e-5)
    assert metrics.nmse(ref, ref, mask) == 0.0


def test_ssim_identical_is_one_and_noise_lowers_it():
    rng = np.random.default_rng(0)
    ref = _ramp((24, 24, 3)) + 2.0
    mask = np.zeros(ref.shape, bool)
    mask[4:20, 4:20] = True
    assert metrics.ssim(ref, ref, mask) == pytest.approx(1.0, abs=1e-6)
    noisy = ref + rng.normal(0, 1.0, ref.shape)
    s = metrics.ssim(noisy, ref, mask)
    assert 0.0 < s < 0.99
    assert metrics.ssim_map(noisy, ref).shape == ref.shape


def test_ssim_tiny_slices():
    ref = _ramp((6, 5, 2)) + 1.0
    mask = np.ones(ref.shape, bool)
    assert metrics.ssim(ref, ref, mask) == pytest.approx(1.0, abs=1e-6)
    assert metrics.ssim(ref * 0.5, ref, mask) < 1.0


def test_suvr_and_bias_by_hand():
    img = np.ones((4, 4, 4))
    region = np.zeros(img.shape, bool)
    region[0] = True
    reference = np.zeros(img.shape, bool)
    reference[3] = True
    img[0] = 3.0
    img[3] = 2.0
    assert metrics.suvr(img, region, reference) == pytest.approx(1.5)
    pred = img.copy()
    pred[0] *= 0.9
    assert metrics.suvr_bias_pct(pred, img, region, reference) == pytest.approx(-10.0)
    assert math.isnan(metrics.suvr(img, np.zeros_like(region), reference))


def _mni_grid(shape=(40, 48, 40), mm=4.0) -> np.ndarray:
    """An affine placing a (shape) grid of ``mm`` voxels centred on MNI (0, -18, 0)."""
    affine = np.diag([mm, mm, mm, 1.0])
    affine[:3, 3] = -np.asarray(shape) * mm / 2 + np.array([0.0, -18.0, 0.0])
    return affine


def test_regional_bias_of_a_ten_percent_dip():
    shape = (40, 48, 40)
    affine = _mni_grid(shape)
    ref = np.full(shape, 4.0, np.float32)
    brain = np.ones(shape, bool)
    ad = ad_mask(shape, affine)
    cereb = region_mask(shape, affine, REFERENCE_REGION)
    assert ad.any() and cereb.any() and not (ad & cereb).any()
    pred = ref.copy()
    pred[ad] *= 0.9
    bias = metrics.regional_bias(pred, ref, brain, affine)
    assert bias["suvr_bias_pct"] == pytest.approx(-10.0, abs=1e-4)
    for r in AD_REGIONS:
        assert bias[f"suvr_bias_{r.name}"] == pytest.approx(-10.0, abs=1e-4)
    # A global scale change leaves SUVR alone.
    assert metrics.regional_bias(1.3 * ref, ref, brain, affine)["suvr_bias_pct"] == pytest.approx(0.0, abs=1e-4)


def test_volume_metrics_keys_and_shape_errors():
    shape = (40, 48, 40)
    affine = _mni_grid(shape)
    rng = np.random.default_rng(1)
    ref = (rng.random(shape) + 1.0).astype(np.float32)
    out = metrics.volume_metrics(ref * 1.05, ref, np.ones(shape, bool), affine)
    assert {"psnr", "ssim", "nmse", "suvr_bias_pct"} <= set(out)
    assert out["nmse"] == pytest.approx(0.0025, rel=1e-4)
    with pytest.raises(ValueError):
        metrics.psnr(ref[:-1], ref, np.ones(shape, bool))
    with pytest.raises(ValueError):
        metrics.nmse(ref, ref, np.zeros(shape, bool))
