"""Enhance whole low-dose PET volumes with a trained model, in the input's units.

``m2diff enhance ldpet=LD.nii.gz [t1=T1.nii.gz] checkpoint=CKPT.pt out=OUT.nii.gz [samples=K]``
writes OUT with the LD file's affine and header, and ``OUT_std.nii.gz`` (voxel-wise standard
deviation of K seeded samples, an uncertainty map) when K > 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from m2diff.data.nifti import Volume, load_volume, save_volume

AFFINE_TOL_MM = 1e-3


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside wrappers (Opacus, DDP, torch.compile), for .is_diffusion / .stride."""
    from m2diff.model import unwrap_model

    return unwrap_model(model)


def voxel_size(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel edge lengths (mm) along X, Y, Z of a NIfTI affine."""
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def keep_ld_low_frequencies(pred: np.ndarray, ld: np.ndarray, fwhm_mm: float,
                            voxel_mm: Sequence[float]) -> np.ndarray:
    """``pred - G(pred) + G(ld)`` with G a 3D Gaussian of ``fwhm_mm`` (X, Y, Z volumes in
    the same units): the enhanced volume keeps the LD scan's own content at scales above
    the FWHM (its regional means: quantitation from the patient's counts, not from what the
    model learned of other subjects) and the model's below it."""
    from scipy.ndimage import gaussian_filter

    sigma = [fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / float(v) for v in voxel_mm]

    def blur(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x.astype(np.float64), sigma, mode="nearest")

    return (pred - blur(pred) + blur(ld)).astype(np.float32)


@torch.no_grad()
def enhance_volume(model: torch.nn.Module, cfg: DictConfig, ld: np.ndarray, t1: np.ndarray | None,
                   device: torch.device | str, seed: int = 0,
                   voxel_mm: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Enhance one LD volume (X, Y, Z) in file units; returns (mean, std | None), (X, Y, Z) float32
    in the same units.

    All axial slices go through the model, ``cfg.sample.batch_size`` at a time. A diffusion
    model is sampled with ``m2diff.model.diffusion.predict_sd`` (cfg.sample: sampler, steps,
    eta); with ``cfg.sample.samples = K > 1`` it is sampled K times (CPU generators seeded
    seed .. seed+K-1, so results do not depend on the device's RNG) and the voxel-wise std of
    the K volumes is returned as well. A regression model is called directly (deterministic:
    std is None). ``t1=None`` or ``cfg.sample.mri = false`` enhances without MRI.
    With ``cfg.sample.ld_lowpass_fwhm_mm`` > 0 every volume keeps the LD's content above that
    scale (``keep_ld_low_frequencies``; needs ``voxel_mm``, the voxel size in mm).
    """
    from m2diff.data.dataset import prepare_volume, restore_volume

    device = torch.device(device)
    bare = _bare(model)
    if not cfg.sample.get("mri", True):
        t1 = None
    prepared = prepare_volume(ld, t1, int(bare.stride), float(cfg.data.norm_percentile))
    ld_slices = torch.as_tensor(np.asarray(prepared.ld, dtype=np.float32)).to(device)
    t1_slices = None if prepared.t1 is None else \
        torch.as_tensor(np.asarray(prepared.t1, dtype=np.float32)).to(device)
    diffusion = bool(bare.is_diffusion)
    k = max(1, int(cfg.sample.get("samples", 1))) if diffusion else 1
    batch = max(1, int(cfg.sample.get("batch_size", 64)))
    fwhm = float(cfg.sample.get("ld_lowpass_fwhm_mm", 0.0) or 0.0)
    if fwhm > 0 and voxel_mm is None:
        raise ValueError("sample.ld_lowpass_fwhm_mm > 0 needs the voxel size (voxel_mm)")
    was_training = model.training
    model.eval()
    volumes: list[np.ndarray] = []
    try:
        for i in range(k):
            if diffusion:
                from m2diff.model.diffusion import predict_sd

                # predict_sd batches by cfg.sample.batch_size itself and draws all of x_T
                # first, so the result does not depend on the batch size.
                generator = torch.Generator().manual_seed(int(seed) + i)
                pred = predict_sd(model, ld_slices, t1_slices, cfg.model, cfg.sample,
                                  generator=generator)
            else:
                pred = torch.cat([
                    model(ld_slices[j:j + batch],
                          None if t1_slices is None else t1_slices[j:j + batch])
                    for j in range(0, ld_slices.shape[0], batch)])
            volume = np.asarray(restore_volume(pred.float().cpu().numpy(), prepared), dtype=np.float32)
            if fwhm > 0:
                volume = keep_ld_low_frequencies(volume, np.asarray(ld, dtype=np.float32), fwhm,
                                                 voxel_mm)  # type: ignore[arg-type]
            volumes.append(volume)
    finally:
        model.train(was_training)
    if k == 1:
        return volumes[0], None
    stack = np.stack(volumes)
    return stack.mean(axis=0).astype(np.float32), stack.std(axis=0).astype(np.float32)


def std_path(out: Path) -> Path:
    """``x/enh.nii.gz`` -> ``x/enh_std.nii.gz`` (also for .nii)."""
    name = out.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return out.with_name(name[: -len(suffix)] + "_std" + suffix)
    return out.with_name(name + "_std.nii.gz")


def run_device(cfg: DictConfig) -> torch.device:
    """The torch device of ``cfg.device`` (cpu | cuda | cuda:N | auto); ConfigError if unusable."""
    from m2diff.device import resolve_device

    return resolve_device(cfg.get("device", "auto"))


def load_for_inference(cfg: DictConfig, path: Path | str,
                       device: torch.device) -> tuple[torch.nn.Module, DictConfig]:
    """Load a checkpoint's model (eval mode, on ``device``) and a copy of ``cfg`` whose
    ``model`` section is the checkpoint's (sampling and data settings stay the caller's).
    Raises m2diff.checkpoint.CheckpointError naming the file."""
    from m2diff.checkpoint import load_model

    model, stored = load_model(Path(path).expanduser(), device)
    cfg = cfg.copy()
    if "arch" in stored:  # the checkpoint keeps the model section only
        cfg.model = stored
    else:
        cfg.model = stored.model
        if "data" in stored and "norm_percentile" in stored.data:
            cfg.data.norm_percentile = stored.data.norm_percentile
    return model.eval(), cfg


def one_line(exc: BaseException, path: Path | str) -> str:
    """First line of an error about ``path``, prefixed with the path unless it names it."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if str(path) in text or Path(path).name in text else f"{path}: {text}"


class InputError(ValueError):
    """An input file the command cannot use; the message names the file."""


def _read(path: Path, what: str) -> Volume:
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        vol = load_volume(path)
    except Exception as exc:  # nibabel raises many types for foreign or damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"{what} {path} is not a readable 3D NIfTI volume ({first})") from None
    if not np.all(np.isfinite(vol.data)):
        raise InputError(f"{what} {path} holds NaN/inf voxels")
    return vol


def read_inputs(ld: Path, t1: Path | None) -> tuple[Volume, Volume | None]:
    """Load the LD (and T1) volumes; raise InputError unless they are readable, 3D and
    co-registered (same shape, affine within 1e-3 mm)."""
    ld_vol = _read(ld, "low-dose PET")
    if t1 is None:
        return ld_vol, None
    t1_vol = _read(t1, "T1")
    if t1_vol.data.shape != ld_vol.data.shape:
        raise InputError(f"T1 {t1} has shape {t1_vol.data.shape}, the low-dose PET {ld} has "
                         f"{ld_vol.data.shape}: they must be co-registered")
    if not np.allclose(t1_vol.affine, ld_vol.affine, atol=AFFINE_TOL_MM):
        raise InputError(f"T1 {t1} has a different affine from the low-dose PET {ld}: "
                         "they must be co-registered")
    return ld_vol, t1_vol


def run_enhance(cfg: DictConfig, args: dict[str, str]) -> int:
    """CLI entry: exit 0 on success, 2 with one line on stderr for bad inputs or checkpoint."""
    from m2diff.config import resolve_path

    ld_file = resolve_path(args["ldpet"])
    t1_file = resolve_path(args.get("t1"))
    out = resolve_path(args["out"])
    try:
        ld, t1 = read_inputs(ld_file, t1_file)
    except InputError as exc:
        print(f"m2diff enhance: {exc}", file=sys.stderr)
        return 2
    device = run_device(cfg)
    ckpt = resolve_path(args["checkpoint"])
    if not ckpt.is_file():
        print(f"m2diff enhance: checkpoint {ckpt} does not exist", file=sys.stderr)
        return 2
    try:
        model, cfg = load_for_inference(cfg, ckpt, device)
    except Exception as exc:  # CheckpointError, or anything a damaged file raises
        print(f"m2diff enhance: {one_line(exc, str(ckpt))}", file=sys.stderr)
        return 2
    mri = t1 is not None and bool(cfg.sample.get("mri", True))
    mean, std = enhance_volume(model, cfg, ld.data, t1.data if t1 is not None else None, device,
                               seed=int(cfg.seed), voxel_mm=voxel_size(ld.affine))
    save_volume(out, mean, ld.affine, ld.header)
    wrote = [str(out)]
    if std is not None:
        save_volume(std_path(out), std, ld.affine, ld.header)
        wrote.append(str(std_path(out)))
    print(f"enhanced {ld_file} ({'with' if mri else 'without'} MRI, {cfg.model.arch}) -> "
          f"{', '.join(wrote)}")
    return 0
