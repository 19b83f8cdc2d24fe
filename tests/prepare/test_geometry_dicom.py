"""Orientation conventions and DICOM stacking, on small synthetic volumes (no simulator)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from m2diff.data.generate.dicom_export import SeriesHeader, uid, write_series
from m2diff.prepare.dicom_series import SeriesError, load_series, scan_series
from m2diff.prepare.geometry import (
    canonical,
    from_sitk,
    matrix_from_sitk,
    rigid_error,
    rigid_to_sitk,
    to_sitk,
)


def oblique_affine(spacing=(1.2, 0.9, 2.5), angles=(10, -5, 20), origin=(10, -20, 30)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def test_sitk_image_has_the_nibabel_grid_in_lps():
    affine = oblique_affine()
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    image = to_sitk(data, affine)
    for ijk in [(0, 0, 0), (4, 1, 6), (2, 5, 3)]:
        lps = np.asarray(image.TransformIndexToPhysicalPoint(ijk))
        ras = (affine @ np.r_[ijk, 1.0])[:3]
        np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-9)
        assert image[ijk] == data[ijk]
    back, back_affine = from_sitk(image)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine, atol=1e-9)


def test_rigid_transforms_convert_both_ways_and_errors_measure_them():
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("zyx", [7, -3, 2], degrees=True).as_matrix()
    m[:3, 3] = [1.0, -2.0, 3.0]
    tx = rigid_to_sitk(m)
    p = np.array([5.0, 6.0, 7.0])
    q = np.asarray(tx.TransformPoint(tuple(p * [-1, -1, 1]))) * [-1, -1, 1]
    np.testing.assert_allclose(q, (m @ np.r_[p, 1])[:3], atol=1e-9)
    np.testing.assert_allclose(matrix_from_sitk(tx), m, atol=1e-12)
    off = m.copy()
    off[:3, 3] += [0.0, 0.0, 0.5]
    mm, deg = rigid_error(off, m, np.zeros((1, 3)))
    assert mm == pytest.approx(0.5, abs=1e-6) and deg == pytest.approx(0.0, abs=1e-4)


def test_canonical_reorders_without_interpolation():
    affine = np.array([[0, 0, 2.0, 5], [-1.5, 0, 0, 7], [0, -3.0, 0, 9], [0, 0, 0, 1]])
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out, out_affine = canonical(data, affine)
    assert np.all(np.diag(out_affine)[:3] > 0) and sorted(out.ravel()) == sorted(data.ravel())
    # the same voxel value sits at the same mm position
    src = affine @ np.r_[1, 2, 3, 1.0]
    idx = np.round(np.linalg.inv(out_affine) @ src).astype(int)[:3]
    assert out[tuple(idx)] == data[1, 2, 3]


def _header(modality="PT", entropy="x"):
    return SeriesHeader(modality, "PET test", 5, "001", uid("study"), uid("for"), entropy,
                        {"Units": "BQML"} if modality == "PT" else {})


@pytest.mark.parametrize("modality", ["PT", "MR"])
def test_dicom_series_round_trip_oblique_and_sorted_by_position(tmp_path, modality):
    rng = np.random.default_rng(1)
    data = (rng.random((12, 10, 9)) * 1000).astype(np.float32)
    affine = oblique_affine()
    files = write_series(tmp_path / "dcm", data, affine, _header(modality))
    assert len(files) == 9
    [series], other = scan_series(sorted(files, reverse=True))
    assert other == [] and series.modality == modality and len(series.files) == 9
    volume, got_affine, header = load_series(series)
    # the reader may stack the other way along the normal: compare through canonical()
    a, aa = canonical(volume, got_affine)
    b, ba = canonical(np.round(data) if modality == "MR" else data, affine)
    np.testing.assert_allclose(aa, ba, atol=1e-3)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=0.05)
    assert "PixelData" not in header


def test_missing_slice_and_duplicate_positions_are_refused(tmp_path):
    data = np.ones((8, 8, 6), np.float32)
    data[2:6, 2:6] = 5.0
    write_series(tmp_path / "gap", data, np.eye(4), _header(entropy="gap"), skip_slices=(3,))
    [series], _ = scan_series((tmp_path / "gap").iterdir())
    with pytest.raises(SeriesError, match=r"not evenly spaced.*slice\(s\) missing"):
        load_series(series)
    files = write_series(tmp_path / "dup", data, np.eye(4), _header(entropy="dup"))
    second = write_series(tmp_path / "dup2", data, np.eye(4), _header(entropy="dup"))
    [series], _ = scan_series(files + second)  # the same series written twice
    with pytest.raises(SeriesError, match="share a position"):
        load_series(series)
