"""Checkpoints (atomic, checked on load) and device resolution."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

import m2diff.checkpoint as ckpt_mod
from m2diff.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from m2diff.config import ConfigError
from m2diff.device import resolve_device
from m2diff.model import build_model
from tests.model.helpers import batch, cfg_for, randomize_zero_params


@pytest.fixture
def saved(tmp_path):
    cfg = cfg_for("tiny")
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(cfg.model))
    path = save_checkpoint(tmp_path / "checkpoint.pt", model, cfg, step=3, round=2)
    return path, model, cfg


def test_round_trip(saved):
    path, model, cfg = saved
    loaded, loaded_cfg = load_model(path, "cpu")
    assert loaded_cfg.model.arch == "m2diff" and list(loaded_cfg.model.channels) == list(cfg.model.channels)
    assert not loaded.training
    b = batch(2)
    t = torch.tensor([5, 700])
    with torch.no_grad():
        assert torch.equal(loaded(b["sd"], t, b["ld"], b["t1"]), model.eval()(b["sd"], t, b["ld"], b["t1"]))
    ckpt = load_checkpoint(path, cfg)
    assert ckpt["format"] == "m2diff-checkpoint/1"
    assert ckpt["extra"] == {"step": 3, "round": 2} and ckpt["round"] == 2


def test_wrapped_model_and_ema_weights_are_saved_with_plain_names(tmp_path):
    cfg = cfg_for("tiny")
    model = build_model(cfg.model)
    ema = build_model(cfg.model)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.5)
    path = save_checkpoint(tmp_path / "c.pt", GradSampleModule(model), cfg, ema=ema)
    state = load_checkpoint(path)["model"]
    assert state.keys() == model.state_dict().keys()
    assert all(torch.all(v == 0.5) for k, v in state.items() if k.endswith("weight"))


def test_missing_truncated_and_foreign_files(tmp_path, saved):
    path, _, _ = saved
    with pytest.raises(CheckpointError, match="no such checkpoint") as err:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(err.value)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*unreadable"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_model(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt: not an m2diff checkpoint"):
        load_checkpoint(foreign)


def test_other_architecture(tmp_path, saved):
    path, _, _ = saved
    with pytest.raises(CheckpointError, match="checkpoint.pt: holds a model.arch=m2diff"):
        load_checkpoint(path, cfg_for("unet"))
    with pytest.raises(CheckpointError, match="checkpoint.pt: weights do not fit"):
        load_checkpoint(path, cfg_for("tiny", "model.channels=[16,32,64]"))
    # weights that do not fit their own stored config
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_cfg"]["num_res_blocks"] = 2
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="bad.pt: stored model config asks for .* weights, the file holds .*: weights do not fit"):
        load_model(bad)


def test_save_is_atomic(tmp_path, saved, monkeypatch):
    path, model, cfg = saved
    before = path.read_bytes()
    real_save = torch.save

    def crash_midway(obj, fh, *a, **kw):
        real_save(obj, fh, *a, **kw)
        fh.truncate(100)  # a partial file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, build_model(cfg_for("unet").model), cfg_for("unet"), step=99)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path, cfg)["extra"]["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="expected auto, cpu"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda:1: CUDA is not available"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_checkpoint_records_its_formulation_and_resume_keeps_it(saved):
    path, _, cfg = saved
    stored = load_checkpoint(path)["model_cfg"]
    assert (stored["formulation"], stored["prediction"], stored["target"],
            stored["residual_scale"], stored["sample_start"]) == ("enhance", "x0", "residual_norm", 4.0, "noise")
    load_checkpoint(path, cfg)  # same formulation: fine
    with pytest.raises(CheckpointError, match="trained with model.prediction=x0, this run uses "
                                              "model.prediction=epsilon"):
        load_checkpoint(path, cfg_for("tiny", "model.formulation=paper"))
    with pytest.raises(CheckpointError, match="model.target=residual_norm"):
        load_checkpoint(path, cfg_for("tiny", "model.target=sd"))


def test_old_epsilon_checkpoint_loads_and_samples_as_epsilon(tmp_path):
    """A checkpoint written before formulations existed (no formulation / prediction keys,
    trained on the SD target with noise prediction) is sampled as noise prediction from
    pure noise, also under today's default config."""
    from m2diff.enhance import load_for_inference
    from m2diff.model.diffusion import formulation, predict_sd

    paper = cfg_for("tiny", "model.formulation=paper")
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(paper.model))
    path = save_checkpoint(tmp_path / "old.pt", model, paper)
    ckpt = torch.load(path, weights_only=True)
    for key in ("formulation", "prediction", "residual_scale", "sample_start"):
        ckpt["model_cfg"].pop(key)
    ckpt["model_cfg"]["target"] = "sd"
    torch.save(ckpt, path)

    loaded, cfg = load_for_inference(cfg_for("tiny"), path, torch.device("cpu"))
    f = formulation(cfg.model)
    assert (f.name, f.prediction, f.target, f.start) == ("legacy", "epsilon", "sd", "noise")
    b = batch(2, 8, 8)
    sample = {**cfg.sample, "steps": 3}
    got = predict_sd(loaded, b["ld"], b["t1"], cfg.model, sample, torch.Generator().manual_seed(1))
    want = predict_sd(model, b["ld"], b["t1"], paper.model, sample, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    other = predict_sd(loaded, b["ld"], b["t1"], cfg_for("tiny").model, sample,
                       torch.Generator().manual_seed(1))
    assert not torch.allclose(got, other, atol=1e-3)  # read as x0 it would differ
