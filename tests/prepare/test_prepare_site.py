"""``m2diff prepare`` on a generated raw export: the known pose is found, the site passes
``m2diff check`` and trains, re-runs are incremental and deterministic."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
from omegaconf import OmegaConf

from m2diff.cli import main
from m2diff.data.layout import ld_path, sd_path, t1_path
from m2diff.prepare.geometry import rigid_error
from m2diff.prepare.pipeline import CONTACT_SHEET, QC, STATE, prepare_site
from m2diff.prepare.register import pet_brain
from tests.prepare.conftest import SUBJECTS, truth


def _registration(site, sid) -> dict:
    return json.loads((site / STATE / f"{sid}.json").read_text())["registration"]


def test_known_pose_recovered_within_1_mm_and_1_degree(prepared, raw_export):
    site, result = prepared
    assert result.failed == {} and len(result.prepared) == SUBJECTS
    for sid, true in truth(raw_export).items():
        found = np.asarray(_registration(site, sid)["PETToT1TransformRAS"])
        pet = nib.load(str(ld_path(site, sid)))
        brain = pet_brain(np.asarray(pet.dataobj), pet.header.get_zooms()[:3])
        points = nib.affines.apply_affine(pet.affine, np.argwhere(brain))
        mm, deg = rigid_error(found, true, points)
        assert mm < 1.0 and deg < 1.0, (sid, mm, deg)


def test_outputs_share_the_pet_grid_and_carry_sidecars_and_qc(prepared, raw_export):
    site, result = prepared
    for sid in result.prepared:
        images = [nib.load(str(p(site, sid))) for p in (t1_path, ld_path, sd_path)]
        assert len({i.shape for i in images}) == 1
        for img in images[1:]:
            np.testing.assert_allclose(img.affine, images[0].affine, atol=1e-6)
        assert nib.aff2axcodes(images[0].affine) == ("R", "A", "S")
        assert images[0].shape == (48, 48, 28)  # the PET's own grid, not the T1's
        ld = json.loads(ld_path(site, sid).with_suffix("").with_suffix(".json").read_text())
        assert ld["Units"] == "Bq/mL" and ld["TracerName"] == "Fluorodeoxyglucose"
        assert ld["CountsFraction"] == 0.25  # site-a-healthy: 1/4 dose, by frame durations
        assert ld["M2DiffPrepare"]["T1Registration"]["Reference"] == "standard-dose PET"
        assert (site / QC / f"{sid}.png").stat().st_size > 10_000
    assert (site / CONTACT_SHEET).stat().st_size > 10_000
    # DICOM subjects were read as DICOM: PET values in Bq/mL (the simulator's kBq/mL x 1000)
    assert float(np.asarray(nib.load(str(ld_path(site, "sub-001"))).dataobj).max()) > 1000.0


def test_prepared_site_passes_check_and_trains(prepared, tmp_path, capsys):
    site, _ = prepared
    assert main(["check", f"data={site}"]) == 0
    out, err = capsys.readouterr()
    assert f"{SUBJECTS} usable subjects" in out and "0 problems" in out and err == ""
    # train on a copy: training writes its slice cache into the site folder
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    code = main(["train", f"data={copy}", "model=tiny", "train.steps=2", "train.batch_size=4",
                 f"out={tmp_path / 'run'}", "device=cpu"])
    assert code == 0 and (tmp_path / "run" / "checkpoint.pt").is_file()


def test_rerun_is_incremental_and_deterministic(prepared, raw_export, prepare_cfg, tmp_path):
    site, _ = prepared
    export, out = tmp_path / "export", tmp_path / "site-a"
    shutil.copytree(raw_export, export)
    shutil.copytree(site, out)
    cfg = OmegaConf.to_container(prepare_cfg.prepare)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    again = prepare_site(export, out, None, cfg)
    assert again.prepared == [] and len(again.unchanged) == SUBJECTS and again.problems == []
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == before
    # the export grows by one subject (a copy of sub-002's scans as 005)
    shutil.copytree(export / "002", export / "005")
    with open(export / "participants.csv", "a") as fh:
        fh.write("005,AD,70\n")
    grown = prepare_site(export, out, None, cfg)
    assert grown.prepared == ["sub-005"] and len(grown.unchanged) == SUBJECTS
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # the same inputs and settings give the same transform, to the last digit
    assert _registration(out, "sub-005")["PETToT1TransformRAS"] == \
        _registration(out, "sub-002")["PETToT1TransformRAS"]
    assert "sub-005\tAD" in (out / "participants.tsv").read_text()


def test_sd_on_another_grid_is_resampled_and_inference_sites_need_no_sd(raw_export, prepare_cfg,
                                                                        tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for sid in ("002", "004"):
        shutil.copytree(raw_export / sid, export / sid)
    (export / "participants.tsv").write_text("participant_id\tdiagnosis\n002\tCN\n004\tAD\n")
    # 002: the SD reconstructed on a grid two slices shorter; 004: no SD at all
    sd = export / "002" / "nifti" / "pet_standard_dose.nii.gz"
    img = nib.load(str(sd))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 2:],
                             img.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2], [0, 0, 0, 1.0]])),
             str(sd))
    (export / "004" / "nifti" / "pet_standard_dose.nii.gz").unlink()
    cfg = OmegaConf.to_container(prepare_cfg.prepare)
    out = tmp_path / "inference"
    result = prepare_site(export, out, None, cfg, require_sd=False)
    assert result.prepared == ["sub-002", "sub-004"]
    assert any("sub-002: standard-dose PET (48, 48, 26) resampled onto the low-dose PET's grid"
               in n for n in result.notes)
    assert nib.load(str(sd_path(out, "sub-002"))).shape == (48, 48, 28)
    assert not sd_path(out, "sub-004").exists()
    ld = json.loads(ld_path(out, "sub-004").with_suffix("").with_suffix(".json").read_text())
    assert ld["M2DiffPrepare"]["T1Registration"]["Reference"] == "low-dose PET"
    assert "CountsFraction" not in ld
