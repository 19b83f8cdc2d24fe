"""Broken exports: each problem is named with its subject, and nothing else is lost."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from m2diff.cli import main
from m2diff.data.layout import ld_path
from m2diff.prepare.pipeline import QC


@pytest.fixture(scope="module")
def broken(raw_export, tmp_path_factory):
    """A copy of the raw export with one thing wrong per subject; sub-005 is sound."""
    export = tmp_path_factory.mktemp("broken") / "export"
    shutil.copytree(raw_export, export)
    shutil.copytree(export / "004", export / "005")  # a sound subject (copy of 004's scans)
    shutil.copytree(export / "003", export / "098")  # scans without a spreadsheet row
    # 001 (DICOM): one slice of the low-dose PET series is missing
    ld_files = [p for p in (export / "001" / "DICOM").iterdir()
                if "low dose" in str(pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription)]
    middle = sorted(ld_files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[10]
    middle.unlink()
    # 002 (NIfTI): the low-dose PET series is missing
    for name in ("pet_low_dose.nii.gz", "pet_low_dose.json"):
        (export / "002" / "nifti" / name).unlink()
    # 003 (DICOM): someone also exported the T1 as NIfTI: two series could be the T1
    (export / "003" / "nifti").mkdir()
    shutil.copy(export / "004" / "nifti" / "t1_mprage_sag.nii.gz",
                export / "003" / "nifti" / "t1_mprage_sag.nii.gz")
    # 004 (NIfTI): a T1 whose header is upside down (180 degrees about left-right): no rigid
    # registration from either start recovers it
    path = export / "004" / "nifti" / "t1_mprage_sag.nii.gz"
    img = nib.load(str(path))
    centre = img.affine @ np.r_[(np.asarray(img.shape) - 1) / 2.0, 1.0]
    flip = np.diag([1.0, -1.0, -1.0, 1.0])
    flip[:3, 3] = centre[:3] - flip[:3, :3] @ centre[:3]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), flip @ img.affine), str(path))
    with open(export / "participants.csv", "a") as fh:
        fh.write("005,CN,61\n099,AD,77\n")  # 099: a row without scans
    return export


def test_each_broken_subject_is_named_and_the_sound_one_prepared(broken, tmp_path, capsys):
    out = tmp_path / "site"
    code = main(["prepare", f"src={broken}", f"out={out}"])
    stdout, stderr = capsys.readouterr()
    assert code == 0 and "Traceback" not in stdout + stderr
    problems = [line for line in stderr.splitlines() if line.startswith("problem:")]

    def one(subject: str, *words: str) -> str:
        lines = [line for line in problems if f"/{subject}" in line]
        assert len(lines) == 1, (subject, problems)
        for word in words:
            assert word in lines[0], (word, lines[0])
        return lines[0]

    one("sub-001", "low-dose PET", "not evenly spaced", "missing")
    one("sub-002", "no low-dose PET found")
    one("sub-003", "2 candidates could be the T1w MRI", "DICOM series", "nifti/t1_mprage_sag.nii.gz")
    one("sub-004", "registration failed", "normalised mutual information")
    one("sub-098", "no row in participants.csv")
    one("sub-099", "listed in the spreadsheet but the export has no folder")
    assert len(problems) == 6
    # nothing else is lost: the sound subject is prepared and the site passes the check
    assert "sub-005: prepared" in stdout and "1 usable subject" in stdout
    assert ld_path(out, "sub-005").is_file()
    assert not any((out / s).exists() for s in ("sub-001", "sub-002", "sub-003", "sub-004"))
    assert (out / QC / "sub-004.png").is_file()  # the failed registration is still shown
    assert main(["check", f"data={out}"]) == 0
    assert capsys.readouterr().err == ""
    # the same export again: nothing is redone, the same problems are reported again
    assert main(["prepare", f"src={broken}", f"out={out}"]) == 0
    stdout, stderr = capsys.readouterr()
    assert "sub-005: unchanged, kept" in stdout and "sub-004: unchanged, still left out" in stdout
    assert stderr.count("problem:") == 6 and "registration failed" in stderr
