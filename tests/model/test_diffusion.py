"""Diffusion formulations (what is predicted, what is diffused, where sampling starts), the
training loss and the DDPM / DDIM samplers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from m2diff.config import ConfigError
from m2diff.model import build_model
from m2diff.model.diffusion import (
    ddim_timesteps,
    formulation,
    make_scheduler,
    predict_sd,
    training_loss,
)
from tests.model.helpers import batch, cfg_for, randomize_zero_params


def _linear_alphas_cumprod(cfg) -> torch.Tensor:
    betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def _hand_loss_terms(model, b, model_cfg, x0, seed: int, prediction: str = "epsilon"
                     ) -> list[torch.Tensor]:
    """MSE(pet, y), MSE(mri, y), MSE(pet, mri) computed by hand, with the same draws as
    training_loss in its order (MRI dropout, noise, timesteps) from ``seed``; y is the noise
    (epsilon), x_0 (x0) or sqrt(a) eps - sqrt(1 - a) x_0 (v)."""
    n = x0.shape[0]
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, generator=g) >= model_cfg.mri_dropout
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, model_cfg.num_train_timesteps, (n,), generator=g)
    ab = _linear_alphas_cumprod(model_cfg)[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    y = {"epsilon": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]
    with torch.no_grad():
        pet, mri = model.forward_heads(x_t, t, b["ld"], b["t1"], mri_keep=keep)
    return [F.mse_loss(pet, y), F.mse_loss(mri, y), F.mse_loss(pet, mri)]


def test_scheduler_is_the_papers_under_the_paper_formulation():
    cfg = cfg_for("tiny", "model.formulation=paper").model
    s = make_scheduler(cfg)
    assert s.num_train_timesteps == 1000 and s.prediction_type == "epsilon"
    assert torch.allclose(s.alphas_cumprod, _linear_alphas_cumprod(cfg), atol=1e-6)
    f = formulation(cfg)
    assert (f.prediction, f.target, f.start) == ("epsilon", "sd", "noise")


def test_formulations_and_overrides():
    base = OmegaConf.to_container(cfg_for("tiny").model)
    default = formulation(base)
    assert (default.name, default.prediction, default.target, default.start) == \
        ("enhance", "x0", "residual_norm", "noise")
    assert make_scheduler(base).prediction_type == "sample"
    v = formulation({**base, "prediction": "v", "target": "sd"})
    assert (v.prediction, v.target, v.start) == ("v", "sd", "noise")
    assert formulation({**base, "sample_start": "ld"}).start == "ld"
    assert make_scheduler({**base, "prediction": "v"}).prediction_type == "v_prediction"
    # A model config from before formulations existed (old checkpoints): noise prediction.
    old = {k: v for k, v in base.items()
           if k not in ("formulation", "prediction", "target", "residual_scale", "sample_start")}
    f = formulation({**old, "target": "residual", "residual_scale": 4.0})
    assert (f.name, f.prediction, f.target, f.start) == ("legacy", "epsilon", "residual", "noise")
    for key, bad in (("formulation", "fancy"), ("prediction", "score"), ("sample_start", "mri"),
                     ("target", "noise"), ("residual_scale", -1)):
        with pytest.raises(ConfigError, match=f"model.{key}"):
            formulation({**base, key: bad})


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("target", ["sd", "residual"])
def test_loss_target_of_each_prediction_by_hand(prediction, target):
    """Both heads and the consistency term follow the prediction type, on a known draw."""
    cfg = cfg_for("tiny", f"model.prediction={prediction}", f"model.target={target}",
                  "model.residual_scale=4")
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(cfg.model)).train()
    b = batch(4)
    loss, logs = training_loss(model, b, cfg.model, make_scheduler(cfg.model),
                               torch.Generator().manual_seed(7))
    x0 = b["sd"] if target == "sd" else 4 * (b["sd"] - b["ld"])
    terms = _hand_loss_terms(model, b, cfg.model, x0, seed=7, prediction=prediction)
    assert loss.item() == pytest.approx(float(0.4 * terms[0] + 0.4 * terms[1] + 0.2 * terms[2]),
                                        rel=1e-4)
    assert logs["mse_pet"] == pytest.approx(float(terms[0]), rel=1e-4)
    assert logs["mse_mri"] == pytest.approx(float(terms[1]), rel=1e-4)
    assert logs["consistency"] == pytest.approx(float(terms[2]), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_ddpm_concat_loss_target_by_hand(prediction):
    cfg = cfg_for("ddpm_concat", f"model.prediction={prediction}", "model.target=residual")
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(cfg.model)).train()
    b = batch(3)
    loss, _ = training_loss(model, b, cfg.model, make_scheduler(cfg.model),
                            torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(3, generator=g) >= cfg.model.mri_dropout
    eps = torch.randn(b["sd"].shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    ab = _linear_alphas_cumprod(cfg.model)[t].view(-1, 1, 1, 1)
    x0 = formulation(cfg.model).residual_scale * (b["sd"] - b["ld"])
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    y = {"epsilon": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]
    with torch.no_grad():
        want = F.mse_loss(model(x_t, t, b["ld"], b["t1"], mri_keep=keep), y)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize("weights", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.4, 0.4, 0.2)])
def test_loss_weights_match_a_hand_computation(weights):
    cfg = cfg_for("tiny", "model.formulation=paper",
                  f"model.loss_weights=[{','.join(map(str, weights))}]")
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
    """The exact predictor for data x_0 ~ N(mu, s^2) per pixel, as eps, x_0 or v (the model
    config's prediction type): samplers can be checked against closed forms (DDPM must
    reproduce N(mu, s^2); the DDIM ODE maps x_T to mu + s x_T). Records its calls."""

    is_diffusion = True
    stride = 1

    def __init__(self, model_cfg, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s
        self.ab = make_scheduler(model_cfg).alphas_cumprod
        self.prediction = formulation(model_cfg).prediction
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, x_t, t, ld, t1=None):
        self.calls.append((int(t[0]), x_t.clone()))
        ab = self.ab[t].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x_t - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)
        x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        return {"epsilon": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction]


def _sample(model, cfg, sampler, steps, seed=0, ld=None, t1=None, **kw):
    sample = {**cfg.sample, "sampler": sampler, "steps": steps, **kw}
    ld = torch.zeros(8, 1, 16, 16) if ld is None else ld
    return predict_sd(model, ld, t1, cfg.model, sample, torch.Generator().manual_seed(seed))


def test_ddim_timesteps_step_exactly_to_the_next_one():
    """MONAI's DDIMScheduler.step goes from t to t - T // num_inference_steps; the timesteps
    used must be exactly that far apart (MONAI's own linspace layout is not, e.g. for 2
    steps: 999 -> 499, then told t = 0), for any number of steps and start."""
    assert ddim_timesteps(1000, 2, 999)[0] == [999, 499]
    for t0 in (999, 700, 500, 250, 99, 10):
        for steps in range(1, min(t0 + 1, 30) + 1):
            ts, n = ddim_timesteps(1000, steps, t0)
            assert len(ts) == steps and ts[0] == t0 and ts[-1] >= 0
            assert all(a - b == 1000 // n for a, b in zip(ts, ts[1:], strict=False)), (ts, n)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_ddim_approaches_the_ode_and_ddpm_with_more_steps(prediction):
    """The samplers read eps, x_0 and v outputs alike (MONAI's prediction_type)."""
    cfg = cfg_for("tiny", "model.formulation=paper", f"model.prediction={prediction}")
    oracle = GaussianOracle(cfg.model, mu=0.5, s=0.3)
    wide = {"clip": [-100.0, 100.0]}
    x_T = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ode = 0.5 + 0.3 * x_T  # exact probability-flow solution from the sampler's own x_T
    ddpm = _sample(oracle, cfg, "ddpm", 1000, **wide)
    assert [t for t, _ in oracle.calls] == list(range(999, -1, -1))
    assert ddpm.mean().item() == pytest.approx(0.5, abs=0.03)
    assert ddpm.std().item() == pytest.approx(0.3, abs=0.03)
    ode_err, std_gap = [], []
    for steps in (10, 25, 100):
        ddim = _sample(oracle, cfg, "ddim", steps, **wide)
        ode_err.append((ddim - ode).abs().mean().item())
        std_gap.append(abs(ddim.std().item() - ddpm.std().item()))
    assert ode_err[0] > ode_err[1] > ode_err[2] and ode_err[2] < 0.02, ode_err
    assert std_gap[0] > std_gap[1] > std_gap[2] and std_gap[2] < 0.015, std_gap


@pytest.mark.parametrize("target", ["sd", "residual"])
def test_sampling_from_ld_starts_at_the_noised_ld(target):
    """start=ld: the first model call sees LD's own x_0 (LD itself, or a zero residual)
    noised to t0 with the generator's first draw, and k DDIM steps follow."""
    cfg = cfg_for("tiny", f"model.target={target}", "model.prediction=x0")
    oracle = GaussianOracle(cfg.model, mu=0.0, s=0.5)
    ld = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    out = _sample(oracle, cfg, "ddim", 3, seed=2, ld=ld, start="ld", t0=0.3)
    t0 = round(0.3 * 999)
    assert [t for t, _ in oracle.calls] == ddim_timesteps(1000, 3, t0)[0]
    ab = oracle.ab[t0]
    x0 = ld if target == "sd" else torch.zeros_like(ld)
    noise = torch.randn(ld.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(oracle.calls[0][1], ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    assert out.shape == ld.shape
    # From pure noise instead: t = T - 1 and x_T is the draw itself.
    oracle.calls.clear()
    _sample(oracle, cfg, "ddim", 2, seed=2, ld=ld, start="noise")
    assert oracle.calls[0][0] == 999 and torch.equal(oracle.calls[0][1], noise)
    with pytest.raises(ConfigError, match="sample.t0"):
        _sample(oracle, cfg, "ddim", 2, ld=ld, start="ld", t0=0.0)
    with pytest.raises(ConfigError, match="sample.start"):
        _sample(oracle, cfg, "ddim", 2, ld=ld, start="mri")


def test_untrained_enhance_model_returns_its_input():
    """The default formulation predicts the residual SD - LD and the network's output conv
    starts at zero: before any training, sampling returns the LD input (clipped), with
    any number of steps and from any start."""
    cfg = cfg_for("tiny")
    model = build_model(cfg.model)
    b = batch(3)
    for kw in ({"start": "ld", "t0": 0.5}, {"start": "noise"}, {"start": "auto"}):
        for steps in (1, 4):
            out = _sample(model, cfg, "ddim", steps, ld=b["ld"], t1=b["t1"], **kw)
            assert torch.equal(out, b["ld"].clamp(-1, 3))


def test_sampling_is_deterministic_per_seed_and_clipped():
    cfg = cfg_for("tiny", "sample.steps=4", "model.formulation=paper")
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
    cfg = cfg_for("tiny", "sample.steps=3", "model.formulation=paper")
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(cfg.model))
    b = batch(5)
    whole = _sample(model, cfg, "ddim", 3, ld=b["ld"], t1=b["t1"], batch_size=64)
    chunked = _sample(model, cfg, "ddim", 3, ld=b["ld"], t1=b["t1"], batch_size=2)
    # float32 convolution kernels differ with the batch size on some CPUs (1.3e-5 seen after
    # 3 steps of a model whose outputs are O(1)); a chunking bug would be O(1) off.
    torch.testing.assert_close(whole, chunked, rtol=0, atol=1e-3)
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
    paper = cfg_for("tiny", "model.formulation=paper").model
    assert torch.equal(to_x0(b["sd"], b["ld"], paper), b["sd"])


def test_ld_noise_level_by_hand():
    """Mean |a - b - c + d| / 2 over the 2 x 2 blocks that are all brain (> -0.8), logged."""
    from m2diff.model.m2diff import ld_noise_level

    block = torch.tensor([[0.6, 0.5], [0.5, 0.6]])  # detail |0.6 - 0.5 - 0.5 + 0.6| / 2 = 0.1
    img = block.repeat(3, 3)
    img[:2, :2] = -1.0  # one background block: left out
    img[2:4, 2:4] = torch.tensor([[0.9, 0.5], [0.5, 0.9]])  # detail 0.4
    level = ld_noise_level(img[None, None])
    assert level.shape == (1,)
    assert float(level[0]) == pytest.approx(math.log((7 * 0.1 + 0.4) / 8 + 1e-3), rel=1e-5)
    flat = torch.full((2, 1, 4, 4), 0.5)
    assert torch.allclose(ld_noise_level(flat), torch.full((2,), math.log(1e-3)))


def test_noise_normalised_residual_target():
    """target=residual_norm (the default): x_0 = (SD - LD) / s with s the LD slice's noise
    level (at least 0.01), so a slice's target does not scale with its dose; back: LD + s x_0."""
    from m2diff.model.diffusion import from_x0, to_x0
    from m2diff.model.m2diff import ld_noise_level

    cfg = cfg_for("tiny")
    b = batch(4)
    b["ld"][2] = 0.3  # a flat slice: noise level 1e-3, floored at 0.01
    s = ld_noise_level(b["ld"]).exp().clamp_min(0.01).view(-1, 1, 1, 1)
    assert float(s[2]) == pytest.approx(0.01)
    x0 = to_x0(b["sd"], b["ld"], cfg.model)
    torch.testing.assert_close(x0, (b["sd"] - b["ld"]) / s)
    torch.testing.assert_close(from_x0(x0, b["ld"], cfg.model), b["sd"], rtol=0, atol=1e-5)
    noise = 0.1 * torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    noisy, quiet = 0.5 + noise, 0.5 + noise / 2  # all brain; half the noise level
    ratio = to_x0(quiet + 0.1, quiet, cfg.model) / to_x0(noisy + 0.1, noisy, cfg.model)
    assert torch.allclose(ratio, torch.full_like(ratio, 2.0), rtol=0.05)  # same residual, 2x x_0


def test_unknown_target_is_a_config_error():
    cfg = cfg_for("tiny", "model.target=noise")
    with pytest.raises(ConfigError, match="model.target"):
        training_loss(build_model(cfg.model).train(), batch(2), cfg.model, None)
