"""DICOM series -> one 3D volume (pydicom): grouped by SeriesInstanceUID, stacked by position.

Files are grouped by their SeriesInstanceUID wherever they lie below the subject's folder
and whatever they are called; a series' slices are ordered by ImagePositionPatient projected
on the slice normal (the cross product of the ImageOrientationPatient cosines), never by
file name or InstanceNumber. A series is refused, with the reason, when its slices disagree
on size, orientation or pixel spacing, two slices share a position (several frames or
echoes), the positions are not evenly spaced (a missing slice), or the stack is sheared
(gantry tilt). Each slice's RescaleSlope / RescaleIntercept is applied (PET stores a slope
per slice). The affine is built in LPS and returned in RAS (nibabel's convention).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from m2diff.prepare.geometry import FLIP

SPACING_TOL = 0.05  # fraction of the median slice spacing a gap may differ by
_HEADER_TAGS = ["SeriesInstanceUID", "Modality", "SeriesDescription", "ProtocolName",
                "SeriesNumber", "ImageType", "NumberOfFrames"]


class SeriesError(ValueError):
    """A DICOM series that cannot become one 3D volume; the message says why."""


@dataclass
class Series:
    """One DICOM series found under a subject's folder: its files and header summary."""

    uid: str
    modality: str
    description: str
    number: int | None
    files: list[Path] = field(default_factory=list)
    frames: int = 1

    @property
    def label(self) -> str:
        """How the series is named to a person: description, number, file count."""
        number = f" #{self.number}" if self.number is not None else ""
        return f"'{self.description or '(no description)'}'{number} ({self.modality}, {len(self.files)} files)"


def scan_series(files: Iterable[Path]) -> tuple[list[Series], list[Path]]:
    """Group DICOM ``files`` by series (headers only). Returns (series, files not DICOM)."""
    groups: dict[str, Series] = {}
    other: list[Path] = []
    for path in sorted(files):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError):
            other.append(path)
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            other.append(path)
            continue
        if series_uid not in groups:
            number = ds.get("SeriesNumber")
            description = str(ds.get("SeriesDescription", "") or "").strip()
            groups[series_uid] = Series(
                uid=series_uid, modality=str(ds.get("Modality", "") or "").upper(),
                description=description or str(ds.get("ProtocolName", "") or "").strip(),
                number=int(number) if number not in (None, "") else None,
                frames=int(ds.get("NumberOfFrames", 1) or 1))
        groups[series_uid].files.append(path)
    return sorted(groups.values(), key=lambda s: (s.number or 0, s.uid)), other


def _cosines(ds: Any) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    if iop.shape != (6,):
        raise SeriesError("ImageOrientationPatient does not have 6 values")
    return iop


def load_series(series: Series) -> tuple[np.ndarray, np.ndarray, Any]:
    """Read and stack a series: ((X, Y, Z) float32 in stored units after rescale, (4, 4) RAS
    affine, the first slice's header without pixel data). Raises SeriesError."""
    if series.frames > 1:
        raise SeriesError(f"multi-frame DICOM ({series.frames} frames in one file) is not "
                          "read here; export it as single-frame files or as NIfTI (dcm2niix)")
    slices = []
    for path in series.files:
        try:
            slices.append(pydicom.dcmread(path))
        except Exception as exc:  # pydicom raises many types for damaged files
            raise SeriesError(f"unreadable file {path.name}: {type(exc).__name__}") from None
    if len(slices) < 2:
        raise SeriesError(f"{len(slices)} slice: not a 3D volume")
    first = slices[0]
    try:
        iop = _cosines(first)
        spacing = [float(v) for v in first.PixelSpacing]
        rows, cols = int(first.Rows), int(first.Columns)
    except (AttributeError, ValueError, TypeError) as exc:
        raise SeriesError(f"geometry tags missing or malformed ({type(exc).__name__})") from None
    for ds in slices[1:]:
        try:
            same = (int(ds.Rows), int(ds.Columns)) == (rows, cols) \
                and np.allclose(_cosines(ds), iop, atol=1e-4) \
                and np.allclose([float(v) for v in ds.PixelSpacing], spacing, atol=1e-4)
        except (AttributeError, ValueError, TypeError):
            same = False
        if not same:
            raise SeriesError("slices differ in size, orientation or pixel spacing "
                              "(a localizer or mixed series?)")
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        raise SeriesError("two or more slices share a position (several frames, echoes or "
                          "repeats in one series); prepare takes one static frame")
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > SPACING_TOL * step)
    if bad.size:
        k = int(bad[0])
        missing = int(round(float(np.sum(gaps[bad]) / step))) - bad.size
        raise SeriesError(
            f"slice positions are not evenly spaced: {gaps[k]:.2f} mm between slices "
            f"{k + 1} and {k + 2} of {len(slices)} (usual {step:.2f} mm); "
            f"{max(missing, 1)} slice(s) missing?")
    offsets = positions - positions[0]
    if np.max(np.abs(offsets - np.outer(offsets @ normal, normal))) > 0.01 * step + 1e-3:
        raise SeriesError("slices are not stacked along their normal (gantry tilt); not supported")

    try:
        planes = [np.asarray(ds.pixel_array, dtype=np.float64)
                  * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
                  for ds in slices]
    except Exception as exc:  # compressed transfer syntax without a decoder, short data, ...
        raise SeriesError(f"pixel data unreadable ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    data = np.stack(planes, axis=-1).transpose(1, 0, 2).astype(np.float32)  # (cols, rows, Z)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]
    lps[:3, 1] = col_cos * spacing[0]
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    lps[:3, 3] = positions[0]
    header = slices[0]
    del header.PixelData  # keep the header only; the pixels are in ``data``
    return data, FLIP @ lps, header
