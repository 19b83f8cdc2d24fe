"""train_steps (the shared loop) and m2diff train (resumable, seeded), on in-memory slices."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import m2diff.data.dataset as dataset_mod
import m2diff.data.validate as validate_mod
from m2diff.checkpoint import load_checkpoint, load_model
from m2diff.cli import main
from m2diff.config import ConfigError
from m2diff.model import build_model
from m2diff.train import EMA, train_steps
from m2diff.train_command import run_train
from tests.model.helpers import cfg_for, fake_slices


def test_tiny_m2diff_overfits_a_few_slices():
    cfg = cfg_for("tiny", "train.lr=2e-3", "train.batch_size=8", "train.ema_decay=0")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    result = train_steps(model, fake_slices(4, 12, 12), cfg, 120, progress=False, step_offset=0)
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-20:])
    assert first / last > 5, (first, last)


def test_result_fields_seeding_and_ema():
    cfg = cfg_for("tiny", "train.batch_size=4", "train.ema_decay=0.9")
    slices = fake_slices(6, 16, 16)
    runs = []
    for offset in (0, 0, 5):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        runs.append(train_steps(model, slices, cfg, 3, progress=False, step_offset=offset))
    a, b, c = runs
    assert a.losses == b.losses and a.losses != c.losses
    assert (a.steps, a.num_examples, len(a.losses)) == (3, 6, 3)
    assert a.loss == pytest.approx(np.mean(a.losses)) and a.seconds > 0
    assert set(a.logs) == {"loss", "mse_pet", "mse_mri", "consistency"}
    assert isinstance(a.ema, EMA) and a.ema.num_updates == 3 and a.optimizer is not None
    trained = build_model(cfg.model)
    a.ema.copy_to(trained)
    assert all(torch.equal(v, a.ema.shadow[k]) for k, v in trained.state_dict().items())
    # with step_offset=None the offset comes from torch's global RNG (seeded by the caller)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        torch.manual_seed(123)
        losses.append(train_steps(model, slices, cfg, 2, progress=False).losses)
    assert losses[0] == losses[1]


@pytest.mark.parametrize("arch", ["unet", "ddpm_concat"])
def test_baselines_train_through_the_same_loop(arch):
    cfg = cfg_for(arch, "train.batch_size=4", "train.lr=1e-3")
    result = train_steps(build_model(cfg.model), fake_slices(4, 16, 16), cfg, 3, progress=False)
    assert result.steps == 3 and np.isfinite(result.losses).all()


def test_subjects_without_t1_train_mri_free():
    cfg = cfg_for("tiny", "train.batch_size=4", "model.mri_dropout=0.0")
    slices = fake_slices(4, 16, 16)
    slices.has_t1 = np.array([True, False, True, False])
    result = train_steps(build_model(cfg.model), slices, cfg, 2, progress=False, step_offset=0)
    assert result.steps == 2
    no_t1 = fake_slices(4, 16, 16, t1=False)
    assert train_steps(build_model(cfg.model), no_t1, cfg, 1, progress=False).steps == 1


@pytest.fixture
def fake_sites(monkeypatch, tmp_path):
    """run_train's data layer replaced by in-memory slices (the real one is tested in tests/data)."""
    (tmp_path / "site-a").mkdir()

    def validate_site(root, require_sd=True):
        return SimpleNamespace(root=root, name=root.name, subjects=["sub-001"]), []

    def load_slices(site, split, data_cfg, seed, stride):
        assert split == "train" and stride == 4
        return fake_slices(6, 16, 16)

    monkeypatch.setattr(validate_mod, "validate_site", validate_site)
    monkeypatch.setattr(dataset_mod, "load_slices", load_slices)
    return tmp_path


def _train(tmp, out, *overrides):
    cfg = cfg_for("tiny", f"data.path={tmp / 'site-a'}", f"out={tmp / out}", "train.batch_size=4",
                  "train.checkpoint_every=2", *overrides)
    return run_train(cfg, {})


def test_run_train_writes_outputs_and_resumes_exactly(fake_sites):
    tmp = fake_sites
    assert _train(tmp, "straight", "train.steps=4") == 0
    assert _train(tmp, "resumed", "train.steps=2") == 0
    assert _train(tmp, "resumed", "train.steps=4") == 0  # continues from step 2
    for out in ("straight", "resumed"):
        assert (tmp / out / "loss.png").stat().st_size > 0
    rows = [list(csv.DictReader((tmp / o / "loss.csv").read_text().splitlines()))
            for o in ("straight", "resumed")]
    assert [r["step"] for r in rows[0]] == ["1", "2", "3", "4"] and rows[0] == rows[1]
    a, b = (load_checkpoint(tmp / o / "checkpoint.pt") for o in ("straight", "resumed"))
    assert a["extra"]["step"] == b["extra"]["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    model, cfg = load_model(tmp / "resumed" / "checkpoint.pt")
    assert cfg.model.arch == "m2diff" and "path" not in cfg.data
    # already at train.steps: nothing to do
    assert _train(tmp, "resumed", "train.steps=4") == 0


def test_run_train_refuses_another_architecture_in_out(fake_sites):
    tmp = fake_sites
    assert _train(tmp, "run", "train.steps=1") == 0
    with pytest.raises(ConfigError, match="checkpoint.pt: holds a model.arch=m2diff"):
        _train(tmp, "run", "train.steps=2", "model=unet")


def test_cli_train_without_data_is_a_one_line_error(capsys):
    assert main(["train", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "data=SITE_DIR" in err and "Traceback" not in err


def test_default_recipe_beats_the_ld_input_on_a_tiny_site(tiny_sites):
    """The product default (formulation, learning rate, sampler), nothing else set: a tiny
    M2Diff trained briefly on the 1/100-dose site's training subjects enhances its held-out
    subject above the LD input (PSNR and SSIM). Real NIfTI files through the data layer."""
    from m2diff.data.dataset import load_slices
    from m2diff.data.splits import split_subjects
    from m2diff.data.validate import validate_site
    from m2diff.evaluate import LD_METHOD, evaluate_subjects

    site, _ = validate_site(next(p for p in tiny_sites if p.name == "site-c-mixed"))
    cfg = cfg_for("tiny", "train.batch_size=8")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    slices = load_slices(site, "train", cfg.data, int(cfg.seed), int(model.stride))
    result = train_steps(model, slices, cfg, 80, progress=False, step_offset=0)
    result.ema.copy_to(model)
    test = split_subjects(site.subjects, list(cfg.data.split), int(cfg.seed))["test"]
    rows = evaluate_subjects(model.eval(), cfg, site, test, "cpu")
    ld = [r for r in rows if r["method"] == LD_METHOD]
    enhanced = [r for r in rows if r["method"] != LD_METHOD]
    assert ld and len(ld) == len(enhanced)
    for before, after in zip(ld, enhanced, strict=True):
        assert after["psnr"] > before["psnr"] + 1.0, (before, after)
        assert after["ssim"] > before["ssim"], (before, after)
