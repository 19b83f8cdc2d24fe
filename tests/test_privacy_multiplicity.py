"""Sample-level DP internals: noise multiplicity (per-slice gradients from torch.func handed
to Opacus' DPOptimizer) and empty Poisson batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from m2diff.config import ConfigError
from m2diff.model import build_model, unwrap_model
from m2diff.model.diffusion import make_scheduler, to_x0, training_loss
from m2diff.privacy import (
    PerSampleGrads,
    accountant_state,
    epsilon,
    history_of,
    make_private,
    noise_multiplicity,
    sample_rate,
)
from m2diff.train import make_optimizer, train_steps
from tests.model.helpers import batch, cfg_for, fake_slices, randomize_zero_params

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DELTA = 1e-5


def _dp_cfg(model: str = "tiny", *overrides: str):
    return cfg_for(model, "privacy=dp", "train.ema_decay=0", *overrides)


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Per-sample gradients equal up to float32 round-off of the whole gradient's scale
    (an attention key bias has a true gradient of 0: its entries are round-off only)."""
    scale = max(float(v.abs().max()) for v in want.values())
    assert scale > 0
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_k1_is_the_default_and_keeps_opacus_hooks():
    cfg = _dp_cfg()
    assert noise_multiplicity(cfg) == 1
    model = build_model(cfg.model)
    private, _, _, _ = make_private(model, make_optimizer(model, cfg.train), fake_slices(8), cfg)
    assert type(private) is GradSampleModule  # Opacus' hooks, as before
    assert not hasattr(private, "grad_sample_step")
    with pytest.raises(ConfigError, match="noise_multiplicity"):
        noise_multiplicity(_dp_cfg("tiny", "privacy.noise_multiplicity=0"))
    with pytest.raises(ConfigError, match="no \\(timestep, noise\\) draws"):
        unet = build_model(cfg_for("unet").model)
        make_private(unet, make_optimizer(unet, cfg.train), fake_slices(8),
                     _dp_cfg("unet", "privacy.noise_multiplicity=2"))


@pytest.mark.parametrize("arch", ["tiny", "ddpm_concat", "unet"])
def test_functional_per_sample_gradients_equal_opacus_hooks(arch):
    """At K = 1 the torch.func path draws what training_loss draws and yields the
    per-sample gradients Opacus' hooks compute."""
    cfg = cfg_for(arch)
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(cfg.model))
    data, scheduler = batch(4), make_scheduler(cfg.model)
    gsm = GradSampleModule(model)
    loss, logs = training_loss(gsm, data, cfg.model, scheduler, torch.Generator().manual_seed(5))
    loss.backward()
    hooks = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    gsm._close()
    for p in model.parameters():
        p.grad_sample = None
    got_logs = PerSampleGrads(model, 1)(data, cfg.model, scheduler,
                                        torch.Generator().manual_seed(5))
    _close({n: p.grad_sample for n, p in model.named_parameters()}, hooks)
    assert got_logs == pytest.approx(logs, rel=1e-5)


@pytest.mark.parametrize("arch", ["tiny", "ddpm_concat"])
@pytest.mark.parametrize("form", ["enhance", "paper"])
def test_k_draws_gradient_is_the_mean_of_single_draw_gradients(arch, form):
    """By hand, per formulation: enhance diffuses the noise-normalised residual x_0
    (``to_x0``, tested by hand in tests/model) and the heads predict x_0; the paper's
    diffuses SD and the heads predict the noise."""
    cfg = cfg_for(arch, f"model.formulation={form}")
    k = 4
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(cfg.model))
    data, scheduler = batch(3), make_scheduler(cfg.model)
    per_slice = PerSampleGrads(model, k)
    draws = per_slice.draws(data, cfg.model, scheduler, torch.Generator().manual_seed(1))
    assert draws.t.shape == (3, k) and draws.noise.shape == (3, k, 1, 16, 16)
    assert len(set(draws.t[0].tolist())) > 1  # independent draws
    grads, _, _ = per_slice.grads(data, cfg.model, scheduler, draws)

    params = dict(model.named_parameters())
    w = [float(v) for v in cfg.model.loss_weights]
    x0 = to_x0(data["sd"], data["ld"], cfg.model)
    if form == "paper":
        assert torch.equal(x0, data["sd"])
    for i in range(3):  # by hand: one slice, one draw at a time, plain autograd
        want = {n: torch.zeros_like(p) for n, p in params.items()}
        for j in range(k):
            t, noise = draws.t[i, j:j + 1], draws.noise[i, j:j + 1]
            x_t = scheduler.add_noise(x0[i:i + 1], noise, t)
            y = noise if form == "paper" else x0[i:i + 1]
            args = (x_t, t, data["ld"][i:i + 1], data["t1"][i:i + 1])
            if arch == "tiny":
                pet, mri = model.forward_heads(*args, mri_keep=draws.keep[i:i + 1])
                loss = (w[0] * F.mse_loss(pet, y) + w[1] * F.mse_loss(mri, y)
                        + w[2] * F.mse_loss(pet, mri))
            else:
                loss = F.mse_loss(model(*args, mri_keep=draws.keep[i:i + 1]), y)
            for name, g in zip(params, torch.autograd.grad(
                    loss, list(params.values()), allow_unused=True), strict=True):
                if g is not None:
                    want[name] += g / k
        _close({n: g[i] for n, g in grads.items()}, want)


def _train_dp(cfg, slices, steps: int, state=None, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    private, opt, loader, engine = make_private(
        model, make_optimizer(model, cfg.train), slices, cfg, state,
        generator=torch.Generator().manual_seed(seed), **kw)
    result = train_steps(private, slices, cfg, steps, optimizer=opt, device="cpu",
                         progress=False, loader=loader, step_offset=0)
    return private, engine, result


def test_epsilon_is_the_same_for_k1_and_k4():
    slices = fake_slices(n=32, h=16, w=16)
    eps, histories = [], []
    for k in (1, 4):
        cfg = _dp_cfg("tiny", "train.batch_size=8", "privacy.noise_multiplier=1.0",
                      f"privacy.noise_multiplicity={k}")
        private, engine, result = _train_dp(cfg, slices, 3)
        assert result.steps == 3
        assert hasattr(private, "grad_sample_step") == (k > 1)
        eps.append(epsilon(engine, DELTA))
        histories.append(history_of(accountant_state(engine)))
    assert histories[0] == histories[1] == [(1.0, sample_rate(32, 8), 3)]
    assert eps[0] == eps[1] > 0
    fresh = RDPAccountant()
    for _ in range(3):
        fresh.step(noise_multiplier=1.0, sample_rate=0.25)
    assert eps[1] == pytest.approx(fresh.get_epsilon(DELTA), rel=1e-12)


def test_dp_tiny_model_with_noise_multiplicity_still_learns():
    cfg = _dp_cfg("tiny", "train.batch_size=8", "train.lr=1e-3", "privacy.noise_multiplier=0.3",
                  "privacy.noise_multiplicity=2")
    _, _, result = _train_dp(cfg, fake_slices(n=32, h=16, w=16), 40)
    losses = result.losses
    assert result.steps == 40 and len(losses) > 30 and all(np.isfinite(losses))
    # From the LD input's own error (the untrained model's, 1.42) to 1.10 in 40 steps.
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:3])


@pytest.mark.parametrize("k", [1, 2])
def test_empty_poisson_batches_take_a_noise_only_step(k):
    """Sample rate 1/64: about a third of the batches are empty; each is a counted step."""
    cfg = _dp_cfg("tiny", "train.batch_size=1", "privacy.noise_multiplier=1.0",
                  f"privacy.noise_multiplicity={k}")
    slices = fake_slices(n=64, h=16, w=16)
    private, engine, result = _train_dp(cfg, slices, 12)
    assert result.steps == 12
    assert 0 < len(result.losses) < 12  # some batches were empty
    assert all(np.isfinite(result.losses))
    assert history_of(accountant_state(engine)) == [(1.0, 1 / 64, 12)]
    assert all(torch.isfinite(p).all() for p in unwrap_model(private).parameters())


def test_all_batches_empty_first_one_included():
    """Opacus' collate fails on an empty *first* batch of dict items unless primed; every
    step is still a counted, noise-only update."""
    cfg = _dp_cfg("tiny", "train.batch_size=4", "privacy.noise_multiplier=1.0")
    slices = fake_slices(n=16, h=16, w=16)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    private, opt, loader, engine = make_private(model, make_optimizer(model, cfg.train), slices,
                                                cfg, None)
    loader.batch_sampler.sample_rate = 0.0  # a certain empty batch (accounting keeps 1/4)
    result = train_steps(private, slices, cfg, 3, optimizer=opt, device="cpu", progress=False,
                         loader=loader)
    assert result.steps == 3 and result.losses == []
    assert history_of(accountant_state(engine)) == [(1.0, 0.25, 3)]
    after = unwrap_model(private).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # noise moved them
