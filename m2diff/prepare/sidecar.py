"""BIDS-style JSON sidecars for the prepared PET volumes.

What the source carries is copied under BIDS PET names where the header has it: from a
DICOM series its Units (BQML -> Bq/mL), tracer, injected activity (MBq), frame duration,
decay correction, attenuation correction and body weight; from a NIfTI its dcm2niix-style
JSON sidecar, when there is one. The low-dose volume also gets ``CountsFraction``, its
frame duration over the standard-dose one's when both are known (list-mode subsampling
gives LD by a shorter frame of the same injection). ``M2DiffPrepare`` records where the
volume came from, whether it was resampled, and the registration's parameters.
"""

from __future__ import annotations

from typing import Any

from m2diff.prepare.discover import Candidate

_UNITS = {"BQML": "Bq/mL", "CNTS": "counts", "GML": "g/mL", "PROPCNTS": "proportional counts"}


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def from_dicom(header: Any) -> dict[str, Any]:
    """BIDS PET fields from a DICOM PET header (pydicom Dataset); missing tags are left out."""
    out: dict[str, Any] = {}
    units = str(header.get("Units", "") or "")
    if units:
        out["Units"] = _UNITS.get(units.upper(), units)
    radio = header.get("RadiopharmaceuticalInformationSequence")
    if radio:
        item = radio[0]
        if item.get("Radiopharmaceutical"):
            out["TracerName"] = str(item.Radiopharmaceutical)
        dose = _number(item.get("RadionuclideTotalDose"))
        if dose is not None:
            out["InjectedRadioactivity"] = round(dose / 1e6, 3)
            out["InjectedRadioactivityUnits"] = "MBq"
        half = _number(item.get("RadionuclideHalfLife"))
        if half is not None:
            out["TracerRadionuclideHalfLife"] = half
        codes = item.get("RadionuclideCodeSequence")
        if codes and codes[0].get("CodeMeaning"):
            out["TracerRadionuclide"] = str(codes[0].CodeMeaning).replace("^", "")
    frame = _number(header.get("ActualFrameDuration"))
    if frame is not None:
        out["FrameDuration"] = [frame / 1000.0]
    decay = str(header.get("DecayCorrection", "") or "")
    if decay:
        out["ImageDecayCorrected"] = decay.upper() != "NONE"
        out["ImageDecayCorrectionTime"] = decay
    corrected = [str(c).upper() for c in (header.get("CorrectedImage") or [])]
    if corrected:
        out["AttenuationCorrection"] = "yes (ATTN)" if "ATTN" in corrected else "none in the header"
    weight = _number(header.get("PatientWeight"))
    if weight:
        out["BodyWeight"] = weight
    if header.get("ReconstructionMethod"):
        out["ReconMethodName"] = str(header.ReconstructionMethod)
    if header.get("SeriesDescription"):
        out["SeriesDescription"] = str(header.SeriesDescription)
    return out


def from_nifti_sidecar(side: dict[str, Any]) -> dict[str, Any]:
    """The same fields from a dcm2niix-style JSON (DICOM tag names, BIDS names kept)."""
    out: dict[str, Any] = {}
    units = side.get("Units")
    if isinstance(units, str) and units:
        out["Units"] = _UNITS.get(units.upper(), units)
    for key in ("TracerName", "TracerRadionuclide", "InjectedRadioactivity",
                "InjectedRadioactivityUnits", "BodyWeight", "SeriesDescription"):
        if key in side:
            out[key] = side[key]
    if "Radiopharmaceutical" in side:
        out.setdefault("TracerName", side["Radiopharmaceutical"])
    dose = _number(side.get("RadionuclideTotalDose"))
    if dose is not None and "InjectedRadioactivity" not in out:
        out["InjectedRadioactivity"] = round(dose / 1e6, 3)
        out["InjectedRadioactivityUnits"] = "MBq"
    frame = side.get("FrameDuration")
    if _number(frame) is not None:
        out["FrameDuration"] = [float(frame)]
    elif isinstance(frame, list) and len(frame) == 1 and _number(frame[0]) is not None:
        out["FrameDuration"] = [float(frame[0])]
    if side.get("DecayCorrection"):
        out["ImageDecayCorrected"] = str(side["DecayCorrection"]).upper() != "NONE"
        out["ImageDecayCorrectionTime"] = side["DecayCorrection"]
    if _number(side.get("PatientWeight")):
        out.setdefault("BodyWeight", float(side["PatientWeight"]))
    return out


def source_fields(candidate: Candidate, header: Any | None) -> dict[str, Any]:
    """BIDS fields for a PET candidate: from its DICOM header or its NIfTI sidecar."""
    if header is not None:
        return from_dicom(header)
    fields = from_nifti_sidecar(candidate.sidecar)
    fields.setdefault("Units", "unknown (NIfTI without a sidecar)" if not candidate.sidecar else "unknown")
    return fields


def counts_fraction(ld: dict[str, Any], sd: dict[str, Any]) -> float | None:
    """LD frame duration / SD frame duration, when both are known and positive."""
    a, b = ld.get("FrameDuration"), sd.get("FrameDuration")
    if a and b and b[0] > 0:
        return round(a[0] / b[0], 6)
    return None
