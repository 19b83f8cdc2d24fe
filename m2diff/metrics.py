"""Per-volume image-quality and regional metrics (docs/METHOD.md section 6).

Every function takes 3D (X, Y, Z) arrays in the same units (PET: file units) and a boolean
brain mask of the same shape. Protocol:

- PSNR, SSIM and NMSE are averaged over the voxels inside the brain mask;
- the data range is the SD (reference) image's ``max - min`` (whole volume, as
  scikit-image's convention), so a prediction cannot change the scale it is judged on;
- SSIM is computed on axial (Z) slices, as the model is 2D: Gaussian window 11, sigma 1.5,
  reflect-padded so the SSIM map has the image's size, then averaged inside the brain mask;
- SUVR = mean over a region / mean over the reference region (cerebellum), both intersected
  with the brain mask; SUVR bias % = 100 * (SUVR_pred - SUVR_ref) / SUVR_ref.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs

from m2diff.regions import AD_REGIONS, REFERENCE_REGION, Region, ad_mask, region_mask

PROTOCOL = (
    "Metrics per subject (3D volume), then mean +- std per cohort (CN/AD), per site and pooled; "
    "PSNR, SSIM (axial 2D, Gaussian 11/1.5, averaged in the brain mask) and NMSE inside the "
    "brain mask, data range = max - min of the SD image; regional SUVR bias (%) in the union of "
    "the AD regions (parietal, posterior cingulate, precuneus, temporal), SUVR reference = "
    "cerebellum."
)


def _check(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if pred.shape != ref.shape or mask.shape != ref.shape:
        raise ValueError(f"shapes differ: pred {pred.shape}, ref {ref.shape}, mask {mask.shape}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("empty brain mask")
    return mask


def data_range(ref: np.ndarray) -> float:
    """``max - min`` of the reference (SD) image; 1.0 for a constant image."""
    rng = float(np.max(ref) - np.min(ref))
    return rng if rng > 0 else 1.0


def psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB over the mask: ``20 log10(range(ref)) - 10 log10(MSE_mask)``; inf if equal."""
    mask = _check(pred, ref, mask)
    p = torch.as_tensor(pred[mask], dtype=torch.float64).reshape(1, 1, -1)
    r = torch.as_tensor(ref[mask], dtype=torch.float64).reshape(1, 1, -1)
    if torch.equal(p, r):
        return math.inf
    return float(PSNRMetric(max_val=data_range(ref), reduction="none")(p, r).item())


def nmse(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """``||pred - ref||^2 / ||ref||^2`` over the mask (dimensionless)."""
    mask = _check(pred, ref, mask)
    p, r = pred[mask].astype(np.float64), ref[mask].astype(np.float64)
    denom = float(np.sum(r * r))
    return float(np.sum((p - r) ** 2) / denom) if denom > 0 else math.nan


def ssim_map(pred: np.ndarray, ref: np.ndarray, win_size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Slice-wise (axial) SSIM map, (X, Y, Z) float64, same size as the inputs.

    MONAI's ``compute_ssim_and_cs`` uses valid convolutions, so each slice is reflect-padded
    by ``win_size // 2`` first; the window shrinks (odd) for slices smaller than it.
    """
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"need two equal 3D shapes, got {pred.shape} and {ref.shape}")
    win = min(win_size, *pred.shape[:2])
    win -= 1 - win % 2  # odd
    pad = win // 2
    # (Z, 1, X, Y): one 2D image per axial slice.
    p = torch.as_tensor(np.moveaxis(pred, 2, 0)[:, None], dtype=torch.float64)
    r = torch.as_tensor(np.moveaxis(ref, 2, 0)[:, None], dtype=torch.float64)
    if pad > 0:
        mode = "reflect" if pad < min(pred.shape[:2]) else "replicate"
        p = F.pad(p, (pad, pad, pad, pad), mode=mode)
        r = F.pad(r, (pad, pad, pad, pad), mode=mode)
    smap, _ = compute_ssim_and_cs(
        p, r, spatial_dims=2, kernel_size=(win, win), kernel_sigma=(sigma, sigma),
        data_range=data_range(ref),
    )
    return np.moveaxis(smap[:, 0].double().numpy(), 0, 2)


def ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Mean of the slice-wise SSIM map inside the mask; 1.0 for identical images."""
    mask = _check(pred, ref, mask)
    return float(np.mean(ssim_map(pred, ref)[mask]))


def suvr(image: np.ndarray, region: np.ndarray, reference: np.ndarray) -> float:
    """``mean(image[region]) / mean(image[reference])`` (boolean masks); nan if undefined."""
    if not region.any() or not reference.any():
        return math.nan
    ref_mean = float(np.mean(image[reference], dtype=np.float64))
    if ref_mean == 0:
        return math.nan
    return float(np.mean(image[region], dtype=np.float64)) / ref_mean


def suvr_bias_pct(pred: np.ndarray, ref: np.ndarray, region: np.ndarray, reference: np.ndarray) -> float:
    """``100 * (SUVR_pred - SUVR_ref) / SUVR_ref`` over boolean region / reference masks."""
    s_pred, s_ref = suvr(pred, region, reference), suvr(ref, region, reference)
    if math.isnan(s_pred) or math.isnan(s_ref) or s_ref == 0:
        return math.nan
    return 100.0 * (s_pred - s_ref) / s_ref


def regional_bias(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                  regions: tuple[Region, ...] = AD_REGIONS,
                  reference: Region = REFERENCE_REGION) -> dict[str, float]:
    """SUVR bias (%) for the union of ``regions`` (key ``suvr_bias_pct``) and each of them
    (``suvr_bias_<name>``); regions are MNI spheres intersected with the brain mask."""
    mask = _check(pred, ref, mask)
    shape = tuple(ref.shape)
    ref_mask = region_mask(shape, affine, reference) & mask
    union = (ad_mask(shape, affine) if regions is AD_REGIONS else
             np.logical_or.reduce([region_mask(shape, affine, r) for r in regions])) & mask
    out = {"suvr_bias_pct": suvr_bias_pct(pred, ref, union, ref_mask)}
    for r in regions:
        out[f"suvr_bias_{r.name}"] = suvr_bias_pct(pred, ref, region_mask(shape, affine, r) & mask,
                                                   ref_mask)
    return out


def volume_metrics(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray,
                   affine: np.ndarray) -> dict[str, float]:
    """All metrics of one predicted volume against its SD reference.

    Returns psnr (dB), ssim, nmse, suvr_bias_pct (AD union) and suvr_bias_<region> (%).
    """
    return {
        "psnr": psnr(pred, ref, mask),
        "ssim": ssim(pred, ref, mask),
        "nmse": nmse(pred, ref, mask),
        **regional_bias(pred, ref, mask, affine),
    }
