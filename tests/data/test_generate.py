"""The cohort simulator: physics, AD effect, layout, determinism, CLI and figure (tiny preset)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio
from skimage.transform import radon

from m2diff.cli import main
from m2diff.config import ConfigError, compose
from m2diff.data.generate.cohort import generate_sites, plan_sites
from m2diff.data.generate.projector import projector
from m2diff.data.generate.settings import read_settings
from m2diff.data.generate.subject import simulate_subject
from m2diff.data.layout import PARTICIPANTS, ld_path, sd_path, t1_path
from m2diff.data.nifti import load_volume
from m2diff.regions import REFERENCE_REGION, ad_mask, region_mask


def _participants(site: Path) -> list[dict[str, str]]:
    with open(site / PARTICIPANTS, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _small(**overrides):
    cfg = compose(["generate=tiny"] + [f"generate.{k}={v}" for k, v in overrides.items()])
    return cfg.generate


@pytest.mark.parametrize("size, n_angles", [(32, 48), (33, 17)])
def test_system_matrix_matches_skimage_radon(size, n_angles):
    proj = projector(size, n_angles)
    image = np.random.default_rng(0).random((size, size))
    image[~proj.support] = 0.0
    expected = radon(image, proj.theta_deg, circle=True)
    got = proj.forward(image[:, :, None].astype(np.float32))[..., 0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.max())


def test_lower_dose_gives_lower_psnr_same_subject(tiny_cfg):
    settings = read_settings(tiny_cfg.generate)
    profile = settings.site_profiles[0]
    vols = {dose: simulate_subject(settings, dataclasses.replace(profile, dose=dose), "CN",
                                   np.random.SeedSequence(7))
            for dose in (0.25, 0.01)}
    np.testing.assert_array_equal(vols[0.25].sd, vols[0.01].sd)  # same SD counts
    sd = vols[0.25].sd
    brain = vols[0.25].activity > 0.1 * vols[0.25].activity.max()
    data_range = float(sd[brain].max() - sd[brain].min())
    psnr = {d: peak_signal_noise_ratio(sd[brain], v.ld[brain], data_range=data_range)
            for d, v in vols.items()}
    assert psnr[0.25] > psnr[0.01] + 6.0, psnr
    # Quantitative: LD and SD in the same kBq/mL units, grey matter ~8-12 kBq/mL.
    assert 2.0 < sd[brain].mean() < 15.0
    assert abs(vols[0.01].ld[brain].mean() / sd[brain].mean() - 1.0) < 0.1


def test_ad_regions_hypometabolic_relative_to_cerebellum(tiny_sites):
    ratios: dict[str, list[float]] = {"CN": [], "AD": []}
    for site in tiny_sites:
        for row in _participants(site):
            sd = load_volume(sd_path(site, row["participant_id"]))
            ad = ad_mask(sd.data.shape, sd.affine)
            ref = region_mask(sd.data.shape, sd.affine, REFERENCE_REGION)
            assert ad.sum() > 10 and ref.sum() > 5  # the slab covers both
            ratios[row["diagnosis"]].append(float(sd.data[ad].mean() / sd.data[ref].mean()))
    assert ratios["CN"] and ratios["AD"]
    assert np.mean(ratios["AD"]) < 0.92 * np.mean(ratios["CN"]), ratios
    assert max(ratios["AD"]) < min(ratios["CN"]), ratios


def test_layout_shapes_and_affines(tiny_sites, tiny_cfg):
    names = [p["name"] for p in tiny_cfg.generate.site_profiles]
    assert [s.name for s in tiny_sites] == names
    shape = tuple(tiny_cfg.generate.shape)
    for site in tiny_sites:
        rows = _participants(site)
        assert [r["participant_id"] for r in rows] == [f"sub-{i:03d}" for i in range(1, 5)]
        assert {r["diagnosis"] for r in rows} <= {"CN", "AD"}
        for row in rows:
            t1, ld, sd = (load_volume(f(site, row["participant_id"]))
                          for f in (t1_path, ld_path, sd_path))
            for vol in (t1, ld, sd):
                assert vol.data.shape == shape and vol.data.dtype == np.float32
                np.testing.assert_array_equal(vol.affine, t1.affine)
            assert np.all(sd.data >= 0) and np.all(ld.data >= 0)
    n_ad = {s.name: sum(r["diagnosis"] == "AD" for r in _participants(s)) for s in tiny_sites}
    assert n_ad == {"site-a-healthy": 0, "site-b-ad-heavy": 3, "site-c-mixed": 2}


def test_plan_cycles_profiles_with_unique_names_and_rounds_ad_fraction(tiny_cfg):
    settings = read_settings(_small(sites=5, subjects=3))
    plans = plan_sites(settings, seed=0)
    assert [p.name for p in plans] == ["site-a-healthy", "site-b-ad-heavy", "site-c-mixed",
                                       "site-a-healthy-2", "site-b-ad-heavy-2"]
    assert [p.diagnoses.count("AD") for p in plans] == [0, 2, 2, 0, 2]  # 2.25 -> 2, 1.5 -> 2
    assert plan_sites(settings, seed=0) == plans


def test_same_seed_same_data_any_worker_count(tmp_path, tiny_cfg):
    def volumes(out: Path, seed: int, workers: int) -> list[np.ndarray]:
        gen = _small(sites=1, subjects=2, workers=workers)
        [site] = generate_sites(gen, out, seed=seed, progress=False)
        return [load_volume(f(site, sid)).data for sid in ("sub-001", "sub-002")
                for f in (t1_path, ld_path, sd_path)]

    first = volumes(tmp_path / "a", 5, workers=2)
    again = volumes(tmp_path / "b", 5, workers=1)
    other = volumes(tmp_path / "c", 6, workers=1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[2], other[2])


def test_cli_generate_writes_layout(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["generate", f"out={out}", "size=tiny", "sites=2", "subjects=2", "seed=1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["site-a-healthy", "site-b-ad-heavy"]
    site = out / "site-b-ad-heavy"
    assert [r["diagnosis"] for r in _participants(site)].count("AD") == 2  # round(0.75 * 2)
    for sid in ("sub-001", "sub-002"):
        assert all(f(site, sid).is_file() for f in (t1_path, ld_path, sd_path))
    assert "wrote 2 site(s)" in capsys.readouterr().out


@pytest.mark.parametrize("words, message", [
    (["sites=0"], "generate.sites must be >= 1"),
    (["subjects=-1"], "generate.subjects must be >= 1"),
    (["shape=[32,16,8]"], "generate.shape"),
    (["z_mm=[0,80]"], "misses the cerebellum reference region"),
])
def test_cli_generate_bad_settings_one_line(tmp_path, capsys, words, message):
    assert main(["generate", f"out={tmp_path}", "size=tiny"] + words) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_cli_generate_unwritable_out_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["generate", f"out={blocker / 'sim'}", "size=tiny", "sites=1", "subjects=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2diff generate: cannot write to") and "\n" not in err


def test_read_settings_rejects_bad_profile(tiny_cfg):
    gen = _small()
    gen.site_profiles[0].dose = 0.0
    with pytest.raises(ConfigError, match=r"site_profiles\[0\]\.dose"):
        read_settings(gen)


def test_figure_cn_and_ad_png(tiny_sites, tmp_path, capsys):
    png = tmp_path / "fig" / "subjects.png"
    parent = tiny_sites[0].parent
    assert main(["figure", f"data={parent}", f"png={png}"]) == 0
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert not list(png.parent.glob(".*tmp*"))
    assert str(png) in capsys.readouterr().out
    assert main(["figure", f"data={tmp_path / 'missing'}"]) == 2
