"""Volume enhancement: units and affine survive the round trip, MRI-free mode, CLI errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from m2diff import enhance
from m2diff.cli import main
from m2diff.config import compose
from m2diff.data.nifti import load_volume, save_volume


class Identity(nn.Module):
    """A regression 'model' honouring the model interface whose SD prediction is its LD input."""

    is_diffusion = False
    stride = 4

    def __init__(self, require_t1: bool | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.require_t1 = require_t1
        self.batches: list[int] = []

    def forward(self, ld: torch.Tensor, t1: torch.Tensor | None = None) -> torch.Tensor:
        if self.require_t1 is not None:
            assert (t1 is not None) == self.require_t1
            if t1 is not None:
                assert t1.shape == ld.shape
        assert ld.shape[-1] % self.stride == 0 and ld.shape[-2] % self.stride == 0
        self.batches.append(ld.shape[0])
        return ld + 0 * self.w


class FakeDiffusion(Identity):
    is_diffusion = True


def _volumes(shape=(30, 26, 7)):
    rng = np.random.default_rng(0)
    ld = (rng.random(shape) * 5000).astype(np.float32)  # Bq/mL-like units
    t1 = (rng.random(shape) * 300).astype(np.float32)
    affine = np.array([[-2.0, 0, 0, 90], [0, 2.5, 0, -120], [0, 0, 3.0, -70], [0, 0, 0, 1]])
    return ld, t1, affine


@pytest.fixture
def cfg():
    # The LD low-pass (on by default) is off here: these tests check the model's own output;
    # test_ld_low_frequencies_replace_the_models switches it on.
    return compose(["model=unet", "sample.batch_size=3", "device=cpu", "sample.ld_lowpass_fwhm_mm=0"])


def test_identity_round_trip_keeps_units(cfg):
    ld, t1, _ = _volumes()
    model = Identity(require_t1=True)
    mean, std = enhance.enhance_volume(model, cfg, ld, t1, "cpu")
    assert std is None and mean.shape == ld.shape and mean.dtype == np.float32
    np.testing.assert_allclose(mean, ld, rtol=1e-5, atol=1e-2)
    assert model.batches == [3, 3, 1]  # all 7 axial slices, batch_size 3


def test_mri_free(cfg):
    ld, t1, _ = _volumes()
    mean, _ = enhance.enhance_volume(Identity(require_t1=False), cfg, ld, None, "cpu")
    np.testing.assert_allclose(mean, ld, rtol=1e-5, atol=1e-2)
    cfg.sample.mri = False
    mean, _ = enhance.enhance_volume(Identity(require_t1=False), cfg, ld, t1, "cpu")
    np.testing.assert_allclose(mean, ld, rtol=1e-5, atol=1e-2)


def test_diffusion_samples_give_std(cfg, monkeypatch):
    import m2diff.model.diffusion as diffusion

    def fake_predict_sd(model, ld, t1, model_cfg, sample_cfg, generator=None):
        noise = torch.randn(ld.shape, generator=generator)
        return ld + 0.01 * noise

    monkeypatch.setattr(diffusion, "predict_sd", fake_predict_sd)
    ld, t1, _ = _volumes()
    cfg.sample.samples = 4
    mean, std = enhance.enhance_volume(FakeDiffusion(), cfg, ld, t1, "cpu", seed=1)
    assert std is not None and std.shape == ld.shape and float(std.mean()) > 0
    np.testing.assert_allclose(mean, ld, atol=0.02 * 5000)
    again, _ = enhance.enhance_volume(FakeDiffusion(), cfg, ld, t1, "cpu", seed=1)
    np.testing.assert_array_equal(mean, again)  # seeded


class Biased(Identity):
    """A regression 'model' that adds a smooth bias field and a fine checkerboard to LD."""

    def forward(self, ld: torch.Tensor, t1: torch.Tensor | None = None) -> torch.Tensor:
        h, w = ld.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        checker = ((yy + xx) % 2).to(ld.dtype) * 0.2 - 0.1
        return ld + 0.3 + 0.2 * torch.cos(yy / h * 3.14) + checker + 0 * self.w


def test_ld_low_frequencies_replace_the_models(cfg):
    """sample.ld_lowpass_fwhm_mm: the model's smooth deviation from LD (a regional bias) is
    removed, its fine detail kept; needs the voxel size; 0 switches it off."""
    ld = np.full((32, 32, 6), 2000.0, dtype=np.float32)  # flat LD: its model-space value is 1
    _, t1, affine = _volumes((32, 32, 6))
    voxel = enhance.voxel_size(affine)
    assert voxel == pytest.approx((2.0, 2.5, 3.0))
    raw, _ = enhance.enhance_volume(Biased(), cfg, ld, t1, "cpu", voxel_mm=voxel)
    cfg.sample.ld_lowpass_fwhm_mm = 20.0
    with pytest.raises(ValueError, match="voxel"):
        enhance.enhance_volume(Biased(), cfg, ld, t1, "cpu")
    kept, _ = enhance.enhance_volume(Biased(), cfg, ld, t1, "cpu", voxel_mm=voxel)
    inner = (slice(8, 24), slice(8, 24), slice(None))
    assert abs(float(raw[inner].mean()) - 2000) > 300  # the model's bias field
    assert float(kept[inner].mean()) == pytest.approx(2000, rel=0.01)  # LD's regional mean
    detail = np.abs(np.diff(kept[inner], axis=0)).mean()
    assert detail == pytest.approx(np.abs(np.diff(raw[inner], axis=0)).mean(), rel=0.1)
    same, _ = enhance.enhance_volume(Identity(), cfg, ld, t1, "cpu", voxel_mm=voxel)
    np.testing.assert_allclose(same, ld, rtol=1e-4)  # a model that returns LD: unchanged


def _write_inputs(tmp_path):
    ld, t1, affine = _volumes()
    ld_file = save_volume(tmp_path / "ld.nii.gz", ld, affine)
    t1_file = save_volume(tmp_path / "t1.nii.gz", t1, affine)
    return ld, affine, ld_file, t1_file


def test_enhance_command_round_trip(tmp_path, monkeypatch, capsys):
    ld, affine, ld_file, t1_file = _write_inputs(tmp_path)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"stub")

    def fake_load(cfg, path, device):
        cfg = cfg.copy()
        cfg.sample.samples = 1
        return Identity(require_t1=True), cfg

    monkeypatch.setattr(enhance, "load_for_inference", fake_load)
    out = tmp_path / "out" / "enh.nii.gz"
    rc = main(["enhance", f"ldpet={ld_file}", f"t1={t1_file}", f"checkpoint={ckpt}", f"out={out}",
               "device=cpu"])
    assert rc == 0, capsys.readouterr().err
    vol = load_volume(out)
    np.testing.assert_allclose(vol.affine, affine)
    np.testing.assert_allclose(vol.data, ld, rtol=1e-5, atol=1e-2)
    assert not enhance.std_path(out).exists()
    assert enhance.std_path(out).name == "enh_std.nii.gz"


def test_enhance_command_rejects_misregistered_t1(tmp_path, capsys):
    ld, affine, ld_file, _ = _write_inputs(tmp_path)
    bad_t1 = save_volume(tmp_path / "t1_bad.nii.gz", np.ones((10, 10, 7), np.float32), affine)
    rc = main(["enhance", f"ldpet={ld_file}", f"t1={bad_t1}", "checkpoint=x.pt",
               f"out={tmp_path / 'o.nii.gz'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "t1_bad.nii.gz" in err
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    rc = main(["enhance", f"ldpet={broken}", "checkpoint=x.pt", f"out={tmp_path / 'o.nii.gz'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "broken.nii.gz" in err


def test_enhance_command_corrupt_checkpoint(tmp_path, capsys):
    pytest.importorskip("m2diff.checkpoint")
    _, _, ld_file, t1_file = _write_inputs(tmp_path)
    ckpt = tmp_path / "corrupt.pt"
    ckpt.write_bytes(b"\x00garbage" * 100)
    rc = main(["enhance", f"ldpet={ld_file}", f"t1={t1_file}", f"checkpoint={ckpt}",
               f"out={tmp_path / 'o.nii.gz'}", "device=cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "corrupt.pt" in err and "Traceback" not in err
    missing = tmp_path / "missing.pt"
    rc = main(["enhance", f"ldpet={ld_file}", f"checkpoint={missing}", f"out={tmp_path / 'o.nii.gz'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "missing.pt" in err


@pytest.mark.parametrize("arch", ["unet", "m2diff"])
def test_enhance_command_real_checkpoint(arch, tmp_path, capsys):
    """A freshly built (untrained) model through save_checkpoint -> m2diff enhance: the output
    is finite, has the LD affine, and samples=2 writes the std volume for diffusion models."""
    checkpoint = pytest.importorskip("m2diff.checkpoint")
    from m2diff.model import build_model

    torch.manual_seed(0)
    model_cfg = compose([f"model={'tiny' if arch == 'm2diff' else arch}"])
    ckpt = checkpoint.save_checkpoint(tmp_path / "m.pt", build_model(model_cfg.model), model_cfg)
    ld, affine, ld_file, t1_file = _write_inputs(tmp_path)
    out = tmp_path / "enh.nii"
    rc = main(["enhance", f"ldpet={ld_file}", f"t1={t1_file}", f"checkpoint={ckpt}", f"out={out}",
               "samples=2", "steps=2", "device=cpu"])
    assert rc == 0, capsys.readouterr().err
    vol = load_volume(out)
    np.testing.assert_allclose(vol.affine, affine)
    assert vol.data.shape == ld.shape and np.isfinite(vol.data).all()
    assert enhance.std_path(out).exists() == (arch == "m2diff")
    # MRI-free: no t1=
    rc = main(["enhance", f"ldpet={ld_file}", f"checkpoint={ckpt}", f"out={tmp_path / 'free.nii.gz'}",
               "steps=2", "device=cpu"])
    assert rc == 0 and "without MRI" in capsys.readouterr().out
