"""M2Diff wiring and the baselines: shapes, fusion at every level, MRI-free mode, Opacus."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from m2diff.config import ConfigError
from m2diff.model import build_model, count_parameters
from m2diff.model.diffusion import make_scheduler, training_loss
from tests.model.helpers import ARCHS, batch, cfg_for, randomize_zero_params


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = cfg_for("tiny")
    return randomize_zero_params(build_model(cfg.model)), cfg


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [(16, 16), (32, 32), (32, 48)])
def test_output_shapes(arch, size):
    model = build_model(cfg_for(arch).model).eval()
    assert size[0] % model.stride == 0 and size[1] % model.stride == 0
    x = batch(2, *size)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        for t1 in (x["t1"], None):
            out = model(x["sd"], t, x["ld"], t1) if model.is_diffusion else model(x["ld"], t1)
            assert out.shape == (2, 1, *size) and out.dtype == torch.float32
            assert torch.isfinite(out).all()
        if arch == "tiny":
            heads = model.forward_heads(x["sd"], t, x["ld"], x["t1"])
            assert [h.shape for h in heads] == [(2, 1, *size)] * 2


def test_flags_and_sizes():
    assert build_model(cfg_for("tiny").model).is_diffusion
    assert build_model(cfg_for("ddpm_concat").model).is_diffusion
    assert not build_model(cfg_for("unet").model).is_diffusion
    assert build_model(cfg_for("tiny").model).stride == 4
    paper = cfg_for("paper").model
    assert list(paper.channels) == [128, 128, 256, 384, 512] and paper.num_res_blocks == 2
    assert paper.num_heads == 4 and paper.dropout == 0.2
    assert count_parameters(build_model(cfg_for("tiny").model)) < 2_000_000


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match="model.arch"):
        build_model(cfg_for("tiny", "model.arch=resnet").model)
    with pytest.raises(ConfigError, match="norm_num_groups"):
        build_model(cfg_for("tiny", "model.channels=[12,32,32]").model)
    with pytest.raises(ConfigError, match="num_heads"):
        build_model(cfg_for("tiny", "model.num_heads=5").model)


def test_t1_changes_pet_head_through_every_fusion_level(tiny):
    """Every MRI-encoder skip (one per decoder block, at every resolution) reaches eps_pet."""
    model, _ = tiny
    model.eval()
    x = batch(2, 16, 16)
    t = torch.tensor([10, 500])
    skips: list[torch.Tensor] = []
    original = model.mri_encoder.forward

    def capture(inp, emb):
        h, s = original(inp, emb)
        for tensor in s:
            tensor.retain_grad()
        skips.extend(s)
        return h, s

    model.mri_encoder.forward = capture
    try:
        eps = model(x["sd"], t, x["ld"], x["t1"])
        eps.square().sum().backward()
    finally:
        del model.mri_encoder.forward
        model.zero_grad(set_to_none=True)
    assert len(skips) == len(model.pet_encoder.skip_channels)
    for i, s in enumerate(skips):
        assert s.grad is not None and s.grad.abs().sum() > 0, f"MRI skip {i} does not reach eps_pet"
    with torch.no_grad():
        other = model(x["sd"], t, x["ld"], x["t1"] + 1.0)
    assert (other - eps.detach()).abs().max() > 1e-4


@pytest.mark.parametrize("mri_dropout", [0.4, 1.0])
def test_every_parameter_gets_a_gradient_in_training(tiny, mri_dropout):
    model, cfg = tiny
    model.train()
    model.mri_dropout = mri_dropout
    try:
        loss, _ = training_loss(model, batch(4), cfg.model, make_scheduler(cfg.model),
                                torch.Generator().manual_seed(1))
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing[:5]
        pet = sum(p.grad.abs().sum() for p in model.pet_encoder.parameters())
        mri = sum(p.grad.abs().sum() for p in model.mri_encoder.parameters())
        assert pet > 0
        if mri_dropout == 1.0:  # every sample MRI-free: MRI skips are PET copies, no MRI signal
            assert mri == 0
        else:
            assert mri > 0
    finally:
        model.mri_dropout = 0.4
        model.zero_grad(set_to_none=True)


def test_mri_free_mode_is_per_sample(tiny):
    """A dropped sample equals the t1=None result; a kept one the full-MRI result."""
    model, _ = tiny
    model.eval()
    x = batch(2, 16, 16)
    t = torch.tensor([50, 50])
    with torch.no_grad():
        free = model.forward_heads(x["sd"], t, x["ld"], None)
        full = model.forward_heads(x["sd"], t, x["ld"], x["t1"])
        mixed = model.forward_heads(x["sd"], t, x["ld"], x["t1"],
                                    mri_keep=torch.tensor([False, True]))
        assert torch.allclose(model(x["sd"], t, x["ld"], None), free[0])
    for head in range(2):
        assert torch.allclose(mixed[head][0], free[head][0], atol=1e-6)
        assert torch.allclose(mixed[head][1], full[head][1], atol=1e-6)
        assert not torch.allclose(free[head][1], full[head][1], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_opacus_compatible(arch):
    cfg = cfg_for(arch)
    model = build_model(cfg.model)
    assert ModuleValidator.validate(model, strict=False) == []
    wrapped = GradSampleModule(model)
    loss, _ = training_loss(wrapped, batch(3), cfg.model, make_scheduler(cfg.model),
                            torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in wrapped.named_parameters() if getattr(p, "grad_sample", None) is None]
    assert not missing, missing[:5]
    assert all(p.grad_sample.shape[0] == 3 for p in wrapped.parameters())
