"""Axial slices of a site in model space, for training and evaluation; whole volumes for enhancement.

Volumes are (X, Y, Z) in file units; a slice is ``volume[:, :, z]`` of shape (X, Y) = (H, W)
before padding. Normalisation (``normalize``), splits (``splits``), masks (``mask``) and the
disk cache (``cache``) live in their own modules and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from m2diff.config import ConfigError
from m2diff.data import cache
from m2diff.data.layout import SPLITS, Site, Subject
from m2diff.data.mask import brain_mask
from m2diff.data.nifti import load_volume
from m2diff.data.normalize import (
    BACKGROUND,
    crop_back,
    from_model,
    pad_or_crop,
    padded_size,
    pet_scale,
    to_model,
)
from m2diff.data.splits import split_subjects

__all__ = ["SliceSet", "PreparedVolume", "load_slices", "prepare_volume", "restore_volume",
           "restore_std", "split_subjects", "pet_scale", "to_model", "from_model", "brain_mask",
           "subject_slices"]

CACHE_VERSION = 1  # bump when the slice extraction below changes meaning


@dataclass
class SliceSet:
    """Axial slices in model space, all padded to one (H, W).

    ``ld`` / ``t1`` / ``sd``: (N, 1, H, W) float32; ``t1`` is None when no subject has a T1,
    ``sd`` None when some subject lacks a standard-dose PET. ``subject`` (N,) indexes
    ``subjects``; ``z`` (N,) is the slice's index along Z; ``scale`` (N,) the LD scale of the
    slice's subject (``from_model(y, scale)`` gives file units); ``has_t1`` (N,) bool is False
    where a subject has no T1 and its ``t1`` slice is background (-1).
    """

    ld: np.ndarray
    t1: np.ndarray | None
    sd: np.ndarray | None
    subject: np.ndarray
    z: np.ndarray
    subjects: list[Subject]
    site: str
    scale: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    has_t1: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        n = len(self)
        if np.shape(self.scale) != (n,):
            self.scale = np.full(n, np.nan, np.float32)
        if np.shape(self.has_t1) != (n,):
            self.has_t1 = np.full(n, self.t1 is not None)

    def __len__(self) -> int:
        return int(self.ld.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of every slice."""
        return int(self.ld.shape[-2]), int(self.ld.shape[-1])

    @staticmethod
    def concat(sets: Sequence[SliceSet]) -> SliceSet:
        """One SliceSet of several (e.g. sites), padded with background to the largest (H, W)."""
        if not sets:
            raise ValueError("SliceSet.concat needs at least one SliceSet")
        size = (max(s.size[0] for s in sets), max(s.size[1] for s in sets))
        offsets = np.cumsum([0] + [len(s.subjects) for s in sets[:-1]])
        any_t1 = any(s.t1 is not None for s in sets)
        all_sd = all(s.sd is not None for s in sets)

        def cat(get) -> np.ndarray:
            return np.concatenate([pad_or_crop(get(s), size) for s in sets])

        return SliceSet(
            ld=cat(lambda s: s.ld),
            t1=cat(lambda s: s.t1 if s.t1 is not None else np.full_like(s.ld, BACKGROUND))
            if any_t1 else None,
            sd=cat(lambda s: s.sd) if all_sd else None,
            subject=np.concatenate([s.subject + o for s, o in zip(sets, offsets, strict=True)]),
            z=np.concatenate([s.z for s in sets]),
            subjects=[subj for s in sets for subj in s.subjects],
            site=",".join(dict.fromkeys(s.site for s in sets)),
            scale=np.concatenate([s.scale for s in sets]),
            has_t1=np.concatenate([s.has_t1 for s in sets]),
        )

    def torch_dataset(self) -> Dataset:
        """A torch Dataset of dicts {"ld", "t1", "sd"}: (1, H, W) float32 tensors.

        "t1" / "sd" are left out when the set has none (default collate cannot batch None).
        """
        return _SliceDataset(self)


class _SliceDataset(Dataset):
    def __init__(self, slices: SliceSet) -> None:
        self.arrays = {k: a for k, a in (("ld", slices.ld), ("t1", slices.t1),
                                         ("sd", slices.sd)) if a is not None}

    def __len__(self) -> int:
        return int(self.arrays["ld"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(a[i])) for k, a in self.arrays.items()}


def subject_slices(subject: Subject, percentile: float, min_brain_fraction: float,
                   max_volume_mb: float | None = None) -> dict[str, np.ndarray]:
    """Brain slices of one subject, unpadded, model space.

    Returns "ld" / "sd" / "t1" (n, 1, X, Y) float32 (sd / t1 only when the subject has
    them), "z" (n,) int64, "scale" and "t1_scale" (0-d float). A slice is kept when the
    brain mask (of the SD PET if present, else the LD) covers >= ``min_brain_fraction`` of it.
    ``max_volume_mb`` bounds each volume by its header (None: the nifti module's default).
    """
    ld = load_volume(subject.ld, max_volume_mb).data
    scale = pet_scale(ld, percentile)
    sd = load_volume(subject.sd, max_volume_mb).data if subject.sd is not None else None
    t1 = load_volume(subject.t1, max_volume_mb).data if subject.t1 is not None else None
    mask = brain_mask(sd if sd is not None else ld)
    area = mask.mean(axis=(0, 1))
    keep = np.flatnonzero(area >= min_brain_fraction)

    def slices(vol: np.ndarray, s: float) -> np.ndarray:
        return to_model(vol[:, :, keep].transpose(2, 0, 1)[:, None], s).astype(np.float32)

    out = {"ld": slices(ld, scale), "z": keep.astype(np.int64),
           "scale": np.array(scale, np.float64)}
    if sd is not None:
        out["sd"] = slices(sd, scale)  # SD in the LD's scale keeps LD -> SD quantitative
    if t1 is not None:
        t1_scale = pet_scale(t1, percentile)
        out["t1"] = slices(t1, t1_scale)
        out["t1_scale"] = np.array(t1_scale, np.float64)
    return out


def load_slices(site: Site, split: str, data_cfg: Mapping[str, Any], seed: int,
                stride: int) -> SliceSet:
    """Brain slices of the site's subjects in ``split`` ("train" | "val" | "test" | "all").

    Uses data_cfg keys split, norm_percentile, min_brain_fraction, image_size, cache_dir.
    Each subject's slices come from the on-disk cache when its files and the settings are
    unchanged. Slices are padded symmetrically with background (-1) to a multiple of
    ``stride`` (or centred in ``data.image_size``, cropping background if smaller).
    """
    if split == "all":
        subjects = list(site.subjects)
    elif split in SPLITS:
        subjects = split_subjects(site.subjects, data_cfg.get("split", (0.7, 0.1, 0.2)),
                                  seed)[split]
    else:
        raise ConfigError(f"unknown split '{split}' (use {', '.join(SPLITS)} or all)")
    percentile = float(data_cfg.get("norm_percentile", 99.5))
    min_fraction = float(data_cfg.get("min_brain_fraction", 0.05))
    folder = cache.cache_folder(site.root, data_cfg.get("cache_dir"))
    site_tag = cache.cache_key({"root": str(site.root.absolute())})[:8]

    per_subject = []
    for subject in subjects:
        key = cache.cache_key({
            "version": CACHE_VERSION, "subject": subject.id, "percentile": percentile,
            "min_brain_fraction": min_fraction,
            "files": [cache.file_stamp(p) for p in (subject.ld, subject.sd, subject.t1)],
        })
        path = cache.cache_path(folder, f"{site_tag}-{subject.id}", key)
        arrays = cache.load_cached(path, key)
        if arrays is None:
            arrays = subject_slices(subject, percentile, min_fraction,
                                    data_cfg.get("max_volume_mb"))
            cache.save_cached(path, key, arrays)
        per_subject.append(arrays)
    return _assemble(site.name, subjects, per_subject, stride, data_cfg.get("image_size"))


def _assemble(site: str, subjects: list[Subject], arrays: list[dict[str, np.ndarray]],
              stride: int, image_size: int | None) -> SliceSet:
    """Pad every subject's slices to a common size and stack them."""
    h = max((a["ld"].shape[-2] for a in arrays), default=1)
    w = max((a["ld"].shape[-1] for a in arrays), default=1)
    size = padded_size(h, w, stride, image_size)

    def stack(key: str) -> np.ndarray:
        parts = [pad_or_crop(a[key] if key in a else np.full_like(a["ld"], BACKGROUND), size)
                 for a in arrays]
        return np.concatenate(parts) if parts else np.zeros((0, 1, *size), np.float32)

    counts = [len(a["z"]) for a in arrays]
    has_t1 = np.concatenate([np.full(n, "t1" in a) for n, a in zip(counts, arrays, strict=True)]
                            + [np.zeros(0, bool)])
    return SliceSet(
        ld=stack("ld"),
        t1=stack("t1") if any("t1" in a for a in arrays) else None,
        sd=stack("sd") if arrays and all("sd" in a for a in arrays) else None,
        subject=np.repeat(np.arange(len(arrays), dtype=np.int64), counts),
        z=np.concatenate([a["z"] for a in arrays] + [np.zeros(0, np.int64)]),
        subjects=list(subjects),
        site=site,
        scale=np.repeat(np.array([float(a["scale"]) for a in arrays], np.float32), counts),
        has_t1=has_t1,
    )


@dataclass
class PreparedVolume:
    """A whole volume as model input: ``ld`` / ``t1`` (Z, 1, H, W) float32 model space.

    ``scale`` / ``t1_scale`` are the normalisation scales (file units), ``shape`` the
    original (X, Y, Z).
    """

    ld: np.ndarray
    t1: np.ndarray | None
    scale: float
    t1_scale: float | None
    shape: tuple[int, int, int]


def prepare_volume(ld: np.ndarray, t1: np.ndarray | None, stride: int, percentile: float,
                   image_size: int | None = None) -> PreparedVolume:
    """All Z slices of an (X, Y, Z) LD volume (and T1), normalised and padded, never cropped."""
    ld = np.asarray(ld, dtype=np.float32)
    if ld.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {ld.shape}")
    if t1 is not None and np.shape(t1) != ld.shape:
        raise ValueError(f"T1 shape {np.shape(t1)} differs from the LD PET's {ld.shape}")
    x, y, _ = ld.shape
    size = padded_size(x, y, stride, image_size)
    if size[0] < x or size[1] < y:
        size = padded_size(x, y, stride)

    def slices(vol: np.ndarray, s: float) -> np.ndarray:
        model = to_model(vol.transpose(2, 0, 1)[:, None].astype(np.float32), s)
        return pad_or_crop(model.astype(np.float32), size)

    scale = pet_scale(ld, percentile)
    t1_scale = pet_scale(t1, percentile) if t1 is not None else None
    return PreparedVolume(ld=slices(ld, scale),
                          t1=slices(np.asarray(t1), t1_scale) if t1 is not None else None,
                          scale=scale, t1_scale=t1_scale, shape=tuple(ld.shape))


def restore_volume(pred: np.ndarray | torch.Tensor, prepared: PreparedVolume) -> np.ndarray:
    """Model-space prediction (Z, 1, H, W) -> (X, Y, Z) float32 in the LD file's units."""
    return from_model(_unpad(pred, prepared), prepared.scale).astype(np.float32)


def restore_std(std: np.ndarray | torch.Tensor, prepared: PreparedVolume) -> np.ndarray:
    """A model-space standard deviation (Z, 1, H, W) -> (X, Y, Z) in file units (no offset)."""
    return (_unpad(std, prepared) * (prepared.scale / 2.0)).astype(np.float32)


def _unpad(pred: np.ndarray | torch.Tensor, prepared: PreparedVolume) -> np.ndarray:
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    pred = np.asarray(pred, dtype=np.float32)
    x, y, z = prepared.shape
    if pred.ndim != 4 or pred.shape[0] != z or pred.shape[1] != 1:
        raise ValueError(f"expected a prediction of shape ({z}, 1, H, W), got {pred.shape}")
    return crop_back(pred, (x, y))[:, 0].transpose(1, 2, 0)
