"""Write a simulated volume as a DICOM series the way a scanner's export would (pydicom).

One file per slice, uncompressed (explicit VR little endian), geometry in the patient LPS+
frame (ImagePositionPatient / ImageOrientationPatient / PixelSpacing), pixel data as 16-bit
integers with a per-slice RescaleSlope, as PET scanners store Bq/mL. PET series carry what
a real PET DICOM has for quantitation: Units (BQML), DecayCorrection, CorrectedImage, the
frame duration and the radiopharmaceutical (tracer, injected activity, half-life, start
time), plus the patient's weight. UIDs are derived from the given entropy, so the same seed
writes the same files. File names are opaque hashes: the reader must sort by position.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
F18_HALF_LIFE_S = 6586.2
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS (nibabel) <-> LPS (DICOM)


@dataclass(frozen=True)
class SeriesHeader:
    """What differs between the series of one export; ``extra`` holds modality-specific tags."""

    modality: str  # "MR" | "PT"
    description: str
    series_number: int
    patient_id: str
    study_uid: str
    frame_of_reference_uid: str
    entropy: str  # makes the series' UIDs reproducible
    extra: dict[str, object] = field(default_factory=dict)


def uid(*parts: object) -> str:
    """A reproducible DICOM UID from ``parts``."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _base(header: SeriesHeader, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = PET_STORAGE if header.modality == "PT" else MR_STORAGE
    ds.Modality = header.modality
    ds.PatientID = header.patient_id
    ds.PatientName = f"Anonymous^{header.patient_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20260101"
    ds.SeriesTime = ds.AcquisitionTime = "101500"
    ds.SeriesDescription = header.description
    ds.ProtocolName = header.description
    ds.SeriesNumber = header.series_number
    ds.Manufacturer = "m2diff simulator"
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.RescaleIntercept = 0
    for key, value in header.extra.items():
        setattr(ds, key, value)
    return ds


def write_series(folder: Path, data: np.ndarray, affine: np.ndarray, header: SeriesHeader,
                 skip_slices: tuple[int, ...] = ()) -> list[Path]:
    """Write (X, Y, Z) ``data`` on the RAS ``affine`` as one file per Z slice under ``folder``.

    Voxel (i, j, k) becomes row j, column i of slice k, so the affine's first column is the
    DICOM row direction. ``skip_slices`` leaves slices out (a broken export, for tests).
    Returns the files written.
    """
    lps = FLIP @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    cosines = lps[:3, :3] / spacing
    series_uid = uid(header.entropy, "series")
    pet = header.modality == "PT"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(data.shape[2]):
        if k in skip_slices:
            continue
        ds = _base(header, series_uid)
        ds.SOPInstanceUID = uid(header.entropy, "slice", k)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in
                                      (*cosines[:, 0], *cosines[:, 1])]
        ds.PixelSpacing = [round(float(spacing[1]), 4), round(float(spacing[0]), 4)]
        ds.SliceThickness = round(float(spacing[2]), 4)
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        plane = np.asarray(data[:, :, k], dtype=np.float64).T  # (rows, columns)
        if pet:
            peak = float(np.abs(plane).max())
            slope = peak / 32767.0 if peak > 0 else 1.0
            pixels = np.round(plane / slope).astype(np.int16)
            ds.PixelRepresentation = 1
            ds.ImageIndex = k + 1
        else:
            slope = 1.0
            pixels = np.clip(np.round(plane), 0, 65535).astype(np.uint16)
            ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:.6g}" if pet else 1
        ds.PixelData = pixels.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        name = hashlib.sha1(ds.SOPInstanceUID.encode()).hexdigest()[:16].upper()
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def pet_tags(description_units: str, frame_s: float, injected_bq: float, weight_kg: float,
             slices: int) -> dict[str, object]:
    """The quantitation tags of an FDG brain PET series (one static frame, decay corrected)."""
    radio = Dataset()
    radio.Radiopharmaceutical = "Fluorodeoxyglucose"
    radio.RadiopharmaceuticalStartTime = "092500"
    radio.RadionuclideTotalDose = f"{injected_bq:.6g}"
    radio.RadionuclideHalfLife = f"{F18_HALF_LIFE_S}"
    radio.RadionuclidePositronFraction = "0.9673"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "C-111A1", "SRT", "^18^Fluorine"
    radio.RadionuclideCodeSequence = [code]
    return {
        "Units": description_units,
        "DecayCorrection": "START",
        "CorrectedImage": ["DECY"],  # the simulator models no attenuation or scatter
        "SeriesType": ["STATIC", "IMAGE"],
        "ActualFrameDuration": int(round(frame_s * 1000)),
        "FrameReferenceTime": 0,
        "NumberOfSlices": slices,
        "NumberOfTimeSlices": 1,
        "ReconstructionMethod": "MLEM",
        "PatientWeight": f"{weight_kg:.1f}",
        "RadiopharmaceuticalInformationSequence": [radio],
    }


def mr_tags() -> dict[str, object]:
    """Typical 3T MPRAGE acquisition tags."""
    return {"MagneticFieldStrength": 3, "RepetitionTime": 2300, "EchoTime": 2.98,
            "InversionTime": 900, "FlipAngle": 9, "ScanningSequence": ["GR", "IR"],
            "SequenceName": "*tfl3d1_16ns", "MRAcquisitionType": "3D"}
