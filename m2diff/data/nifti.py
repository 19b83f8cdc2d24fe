"""Read and write NIfTI volumes with nibabel, keeping affine and header.

Reading is bounded: a header can claim any shape (a 74-byte file asked for 512 x 512 x 1024
voxels, 1 GiB once decoded) and a gzip stream can expand a thousandfold, so the header is
read on its own first (``header_bytes``) and a volume whose decoded size exceeds the
bound (``data.max_volume_mb``, default ``MAX_VOLUME_MB``) is refused before nibabel reads
or allocates anything. nibabel then decompresses only the bytes the header accounts for.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

MAX_VOLUME_MB = 512.0  # default bound on one volume's bytes (decoded float32, or stored if larger)


@dataclass
class Volume:
    """A 3D volume: ``data`` (X, Y, Z) float32 in the file's units, ``affine`` (4, 4) voxel->mm."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in mm."""
        return tuple(float(z) for z in self.header.get_zooms()[:3])


def as_3d(data: np.ndarray) -> np.ndarray:
    """Drop trailing singleton axes beyond the third ((X, Y, Z, 1) -> (X, Y, Z)).

    Raises ValueError when the result is not 3D (a 2D image, a 4D series).
    """
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got {data.ndim}D with shape {tuple(data.shape)}")
    return data


class VolumeTooLarge(ValueError):
    """A volume whose header claims more bytes than the site's bound."""


def header_bytes(path: Path) -> int | None:
    """Bytes a NIfTI-1/2 file (plain or gzip) needs once read: ``vox_offset`` (header and
    extensions) plus voxels x max(stored itemsize, 4 for the decoded float32). Reads only
    the first 540 (decompressed) bytes; None when the file is not a NIfTI header nibabel
    would accept, so that nibabel reports it."""
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if gz else raw
        try:
            block = stream.read(540)
        except (OSError, EOFError):
            return None
    for order in ("<", ">"):
        if len(block) < 348:
            return None
        size = int(np.frombuffer(block[:4], dtype=f"{order}i4")[0])
        klass = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
        if klass is None or len(block) < size:
            continue
        try:
            hdr = klass(binaryblock=block[:size], endianness=order, check=False)
            dims = [int(d) for d in hdr["dim"][1:1 + max(0, min(7, int(hdr["dim"][0])))]]
            itemsize = int(np.dtype(hdr.get_data_dtype()).itemsize)
        except Exception:  # noqa: BLE001 - a foreign header: nibabel will say what is wrong
            return None
        voxels = math.prod(max(d, 0) for d in dims) if dims else 0
        return int(hdr["vox_offset"]) + voxels * max(itemsize, 4)
    return None


def check_volume_size(path: Path, max_mb: float | None = None) -> None:
    """Raise VolumeTooLarge when ``path``'s header claims more than ``max_mb`` MiB
    (``MAX_VOLUME_MB`` when None); nothing beyond the header is read."""
    limit = float(MAX_VOLUME_MB if max_mb is None else max_mb)
    need = header_bytes(path)
    if need is not None and need > limit * 2**20:
        raise VolumeTooLarge(f"header claims {need / 2**20:.0f} MiB of voxel data, more than "
                             f"data.max_volume_mb={limit:g}; not read")


def load_volume(path: Path, max_mb: float | None = None) -> Volume:
    """Load a NIfTI file as float32 (X, Y, Z); raises on unreadable, non-3D or too large
    (``check_volume_size``) files."""
    check_volume_size(path, max_mb)
    img = nib.load(str(path))
    data = as_3d(np.asarray(img.get_fdata(dtype=np.float32)))
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header.copy())


def save_volume(path: Path, data: np.ndarray, affine: np.ndarray,
                header: nib.Nifti1Header | None = None) -> Path:
    """Write (X, Y, Z) float32 data as NIfTI (gzip by suffix), atomically (tmp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine, hdr)
    img.header.set_data_dtype(np.float32)
    if hdr is not None:
        # Scaling from the input header would re-quantise our float output.
        img.header.set_slope_inter(1.0, 0.0)
    tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path
