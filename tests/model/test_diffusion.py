"""Training loss weights and the DDPM / DDIM samplers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m2diff.config import ConfigError
from m2diff.model import build_model
from m2diff.model.diffusion import make_scheduler, predict_sd, training_loss
from tests.model.helpers import batch, cfg_for, randomize_zero_params


def _linear_alphas_cumprod(cfg) -> torch.Tensor:
    betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def _hand_loss_terms(model, b, model_cfg, x0, seed: int) -> list[torch.Tensor]:
    """MSE(eps_pet, eps), MSE(eps_mri, eps), MSE(eps_pet, eps_mri) computed by hand, with the
    same draws as training_loss in its order (MRI dropout, noise, timesteps) from ``seed``."""
    n = x0.shape[0]
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, generator=g) >= model_cfg.mri_dropout
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, model_cfg.num_train_timesteps, (n,), generator=g)
    ab = _linear_alphas_cumprod(model_cfg)[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    with torch.no_grad():
        eps_pet, eps_mri = model.forward_heads(x_t, t, b["ld"], b["t1"], mri_keep=keep)
    return [F.mse_loss(eps_pet, eps), F.mse_loss(eps_mri, eps), F.mse_loss(eps_pet, eps_mri)]


def test_scheduler_is_the_papers():
    cfg = cfg_for("tiny").model
    s = make_scheduler(cfg)
    assert s.num_train_timesteps == 1000 and s.prediction_type == "epsilon"
    assert torch.allclose(s.alphas_cumprod, _linear_alphas_cumprod(cfg), atol=1e-6)


@pytest.mark.parametrize("weights", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.4, 0.4, 0.2)])
def test_loss_weights_match_a_hand_computation(weights):
    cfg = cfg_for("tiny", f"model.loss_weights=[{','.join(map(str, weights))}]")
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(cfg.model)).train()
    b = batch(4)
    loss, logs = training_loss(model, b, cfg.model, make_scheduler(cfg.model),
                               torch.Generator().manual_seed(7))

    terms = _hand_loss_terms(model, b, cfg.model, b["sd"], seed=7)
    expected = sum(w * term for w, term in zip(weights, terms, strict=True))
    assert loss.item() == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert logs["mse_pet"] == pytest.approx(float(terms[0]), rel=1e-4)
    assert logs["consistency"] == pytest.approx(float(terms[2]), rel=1e-4, abs=1e-7)


def test_unet_loss_is_mse_to_sd():
    cfg = cfg_for("unet")
    model = build_model(cfg.model).eval()
    b = batch(3)
    loss, _ = training_loss(model, b, cfg.model, None)
    with torch.no_grad():
        assert loss.item() == pytest.approx(F.mse_loss(model(b["ld"], b["t1"]), b["sd"]).item(), rel=1e-5)


class GaussianOracle(nn.Module):
    """The exact eps predictor for data x_0 ~ N(mu, s^2) per pixel: samplers can be checked
    against closed forms (DDPM must reproduce N(mu, s^2); the DDIM ODE maps x_T to mu + s x_T)."""

    is_diffusion = True
    stride = 1

    def __init__(self, model_cfg, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s
        self.ab = make_scheduler(model_cfg).alphas_cumprod

    def forward(self, x_t, t, ld, t1=None):
        ab = self.ab[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)


def _sample(model, cfg, sampler, steps, seed=0, ld=None, t1=None, **kw):
    sample = {**cfg.sample, "sampler": sampler, "steps": steps, **kw}
    ld = torch.zeros(8, 1, 16, 16) if ld is None else ld
    return predict_sd(model, ld, t1, cfg.model, sample, torch.Generator().manual_seed(seed))


def test_ddim_approaches_the_ode_and_ddpm_with_more_steps():
    cfg = cfg_for("tiny")
    oracle = GaussianOracle(cfg.model, mu=0.5, s=0.3)
    wide = {"clip": [-100.0, 100.0]}
    x_T = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ode = 0.5 + 0.3 * x_T  # exact probability-flow solution from the sampler's own x_T
    ddpm = _sample(oracle, cfg, "ddpm", 1000, **wide)
    assert ddpm.mean().item() == pytest.approx(0.5, abs=0.03)
    assert ddpm.std().item() == pytest.approx(0.3, abs=0.03)
    ode_err, std_gap = [], []
    for steps in (10, 25, 100):
        ddim = _sample(oracle, cfg, "ddim", steps, **wide)
        ode_err.append((ddim - ode).abs().mean().item())
        std_gap.append(abs(ddim.std().item() - ddpm.std().item()))
    assert ode_err[0] > ode_err[1] > ode_err[2] and ode_err[2] < 0.02, ode_err
    assert std_gap[0] > std_gap[1] > std_gap[2] and std_gap[2] < 0.015, std_gap


def test_sampling_is_deterministic_per_seed_and_clipped():
    cfg = cfg_for("tiny", "sample.steps=4")
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(cfg.model))
    b = batch(3)
    for sampler, extra in (("ddim", {}), ("ddim", {"eta": 1.0}), ("ddpm", {})):
        steps = 4
        # ddpm runs the full 1000-step schedule: use the (free) oracle there
        model_ = GaussianOracle(cfg.model, 0.0, 0.5) if sampler == "ddpm" else model
        a = _sample(model_, cfg, sampler, steps, seed=1, ld=b["ld"], t1=b["t1"], **extra)
        again = _sample(model_, cfg, sampler, steps, seed=1, ld=b["ld"], t1=b["t1"], **extra)
        other = _sample(model_, cfg, sampler, steps, seed=2, ld=b["ld"], t1=b["t1"], **extra)
        assert torch.equal(a, again)
        assert not torch.allclose(a, other)
        assert a.shape == b["ld"].shape and a.min() >= -1.0 and a.max() <= 3.0
    assert model.training  # predict_sd restores the mode


def test_batch_size_and_mri_switch():
    cfg = cfg_for("tiny", "sample.steps=3")
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(cfg.model))
    b = batch(5)
    whole = _sample(model, cfg, "ddim", 3, ld=b["ld"], t1=b["t1"], batch_size=64)
    chunked = _sample(model, cfg, "ddim", 3, ld=b["ld"], t1=b["t1"], batch_size=2)
    assert torch.allclose(whole, chunked, atol=1e-5)
    free = _sample(model, cfg, "ddim", 3, ld=b["ld"], t1=None)
    switched = _sample(model, cfg, "ddim", 3, ld=b["ld"], t1=b["t1"], mri=False)
    assert torch.equal(free, switched) and not torch.allclose(free, whole)


def test_regression_baseline_predicts_in_one_pass():
    cfg = cfg_for("unet")
    model = build_model(cfg.model)
    b = batch(2)
    out = predict_sd(model, b["ld"], b["t1"], cfg.model, cfg.sample)
    with torch.no_grad():
        assert torch.equal(out, model.eval()(b["ld"], b["t1"]).clamp(-1, 3))


def test_bad_sampler_settings():
    cfg = cfg_for("tiny")
    model = build_model(cfg.model)
    with pytest.raises(ConfigError, match="sample.sampler"):
        _sample(model, cfg, "euler", 5)
    with pytest.raises(ConfigError, match="sample.steps"):
        _sample(model, cfg, "ddim", 0)


def test_residual_target_diffuses_scaled_sd_minus_ld():
    """model.target=residual: x_0 = scale * (SD - LD) in the forward process, and a sampled x_0
    maps back to LD + x_0 / scale."""
    from m2diff.model.diffusion import from_x0, to_x0

    cfg = cfg_for("tiny", "model.target=residual", "model.residual_scale=4")
    b = batch(4)
    x0 = to_x0(b["sd"], b["ld"], cfg.model)
    assert torch.allclose(x0, 4 * (b["sd"] - b["ld"]))
    assert torch.allclose(from_x0(x0, b["ld"], cfg.model), b["sd"], atol=1e-6)
    assert torch.equal(to_x0(b["sd"], b["ld"], cfg_for("tiny").model), b["sd"])  # the paper's

    model = randomize_zero_params(build_model(cfg.model)).train()
    loss, _ = training_loss(model, b, cfg.model, make_scheduler(cfg.model),
                            torch.Generator().manual_seed(7))
    terms = _hand_loss_terms(model, b, cfg.model, x0, seed=7)
    expected = 0.4 * terms[0] + 0.4 * terms[1] + 0.2 * terms[2]
    assert loss.item() == pytest.approx(float(expected), rel=1e-4)


def test_unknown_target_is_a_config_error():
    cfg = cfg_for("tiny", "model.target=noise")
    with pytest.raises(ConfigError, match="model.target"):
        training_loss(build_model(cfg.model).train(), batch(2), cfg.model, None)
