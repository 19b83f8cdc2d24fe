"""Diffusion training loss and samplers (MONAI DDPM / DDIM schedulers) for all three archs.

Everything lives in model space (docs/CONTRACTS.md). The diffused x_0 is ``model.target``:
``sd`` (the paper: the SD slice itself) or ``residual`` (``residual_scale * (SD - LD)``, the
dose-dependent noise and bias that LD lacks; the prediction is LD + x_0 / scale). Both are
conditioned on LD (and T1). Sampling starts from x_T ~ N(0, I) and follows the PET head (M2Diff) or the single
eps head (ddpm_concat). The regression baseline (unet) goes through the same two functions:
its loss is MSE(pred, SD), its "sampler" one forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from m2diff.config import ConfigError
from m2diff.model import unwrap_model

DEFAULT_CLIP = (-1.0, 3.0)  # model space: -1 is zero activity; SD may exceed the LD p99.5 scale


def _get(cfg: Any, key: str, default: Any) -> Any:
    value = cfg.get(key, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else default
    return default if value is None else value


def make_scheduler(model_cfg: Any) -> DDPMScheduler:
    """The training (forward-process) scheduler: 1000 steps, linear betas, eps prediction."""
    return DDPMScheduler(num_train_timesteps=int(_get(model_cfg, "num_train_timesteps", 1000)),
                         schedule=str(_get(model_cfg, "beta_schedule", "linear_beta")),
                         beta_start=float(_get(model_cfg, "beta_start", 1e-4)),
                         beta_end=float(_get(model_cfg, "beta_end", 0.02)),
                         prediction_type="epsilon")


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """N(0, 1) on ``device``, drawn from ``generator`` wherever that lives (CPU or CUDA)."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _mri_keep(model: nn.Module, batch: int, generator: torch.Generator | None,
              device: torch.device) -> Tensor:
    """(B,) bool: which training samples keep their MRI (per sample, p(drop) = mri_dropout)."""
    p = float(getattr(model, "mri_dropout", 0.0))
    return _rand(batch, generator, device) >= p


def training_loss(model: nn.Module, batch: Mapping[str, Tensor | None], model_cfg: Any,
                  scheduler: DDPMScheduler | None, generator: torch.Generator | None = None,
                  ) -> tuple[Tensor, dict[str, float]]:
    """One minibatch loss. batch: {"ld", "t1" (may be None/absent), "sd"}, each (B, 1, H, W),
    and optionally "has_t1" (B,) bool: slices of subjects without a T1 always train MRI-free.

    m2diff: w0 * MSE(eps_pet, eps) + w1 * MSE(eps_mri, eps) + w2 * MSE(eps_pet, eps_mri)
    with w = model.loss_weights; ddpm_concat: MSE(eps_hat, eps); unet: MSE(pred, sd).
    Each MSE is a mean over all elements, i.e. a mean of per-sample means (what Opacus'
    loss_reduction="mean" assumes). Noise, timesteps and MRI dropout come from ``generator``.
    Returns the loss (graph attached) and float logs.
    """
    ld, sd, t1 = batch["ld"], batch["sd"], batch.get("t1")
    if sd is None:
        raise ValueError("training needs SD slices (batch['sd'] is None)")
    bare = unwrap_model(model)
    device, size = ld.device, ld.shape[0]
    keep = _mri_keep(bare, size, generator, device) if model.training else None
    has_t1 = batch.get("has_t1")
    if has_t1 is not None and t1 is not None:
        has_t1 = has_t1.to(device=device, dtype=torch.bool)
        keep = has_t1 if keep is None else keep & has_t1
    if not bare.is_diffusion:
        loss = F.mse_loss(model(ld, t1, mri_keep=keep), sd)
        return loss, {"loss": float(loss.detach())}

    scheduler = scheduler or make_scheduler(model_cfg)
    x0 = to_x0(sd, ld, model_cfg)
    noise = _randn(tuple(sd.shape), generator, device)
    steps = scheduler.num_train_timesteps
    if generator is None:
        t = torch.randint(0, steps, (size,), device=device)
    else:
        t = torch.randint(0, steps, (size,), generator=generator, device=generator.device).to(device)
    x_t = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)

    if not hasattr(bare, "forward_heads"):  # ddpm_concat
        loss = F.mse_loss(model(x_t, t, ld, t1, mri_keep=keep), noise)
        return loss, {"loss": float(loss.detach())}

    weights = [float(w) for w in _get(model_cfg, "loss_weights", (0.4, 0.4, 0.2))]
    if len(weights) != 3:
        raise ConfigError(f"model.loss_weights={weights}: expected 3 weights (pet, mri, consistency)")
    # Opacus' GradSampleModule only hooks forward(); reach forward_heads through it.
    heads = model.forward_heads if hasattr(model, "forward_heads") else bare.forward_heads
    eps_pet, eps_mri = heads(x_t, t, ld, t1, mri_keep=keep)
    terms = torch.stack([F.mse_loss(eps_pet, noise), F.mse_loss(eps_mri, noise),
                         F.mse_loss(eps_pet, eps_mri)])
    loss = (torch.tensor(weights, device=device, dtype=terms.dtype) * terms).sum()
    logs = dict(zip(("mse_pet", "mse_mri", "consistency"), terms.detach().float().tolist(), strict=True))
    logs["loss"] = float(loss.detach())
    return loss, logs


def diffusion_target(model_cfg: Any) -> tuple[str, float]:
    """(``model.target``, ``model.residual_scale``): what the diffusion generates."""
    target = str(_get(model_cfg, "target", "sd")).lower()
    if target not in ("sd", "residual"):
        raise ConfigError(f"model.target={target!r}: expected sd or residual")
    return target, float(_get(model_cfg, "residual_scale", 1.0))


def to_x0(sd: Tensor, ld: Tensor, model_cfg: Any) -> Tensor:
    """The diffused sample x_0 for SD slices (B, 1, H, W) in model space."""
    target, scale = diffusion_target(model_cfg)
    return sd if target == "sd" else scale * (sd - ld)


def from_x0(x0: Tensor, ld: Tensor, model_cfg: Any) -> Tensor:
    """SD slices in model space from a sampled x_0; inverse of ``to_x0``."""
    target, scale = diffusion_target(model_cfg)
    return x0 if target == "sd" else ld + x0 / scale


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` derived from ``generator`` (MONAI's step draws noise there)."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


@torch.inference_mode()
def predict_sd(model: nn.Module, ld: Tensor, t1: Tensor | None, model_cfg: Any, sample_cfg: Any,
               generator: torch.Generator | None = None) -> Tensor:
    """Predict SD slices in model space: ld, t1 (B, 1, H, W) (t1 may be None) -> (B, 1, H, W).

    Diffusion models: ``sample.sampler`` ddim (``sample.steps`` steps, ``sample.eta``; default)
    or ddpm (the full ``num_train_timesteps`` schedule), ``sample.batch_size`` slices denoised
    together, every x_0 estimate clipped to ``sample.clip``. ``sample.mri: false`` ignores t1
    (MRI-free). Deterministic for a given ``generator`` state. Runs on ld's device, in eval mode
    (the model's mode is restored afterwards).
    """
    lo, hi = (float(v) for v in _get(sample_cfg, "clip", DEFAULT_CLIP))
    if not _get(sample_cfg, "mri", True):
        t1 = None
    device = ld.device
    bare = unwrap_model(model)
    was_training = model.training
    model.eval()
    try:
        if not bare.is_diffusion:
            return model(ld, t1).clamp(lo, hi)
        sampler = str(_get(sample_cfg, "sampler", "ddim")).lower()
        target, scale = diffusion_target(model_cfg)
        # x_0 estimates are clipped where SD = LD + x_0 / scale can still land inside [lo, hi].
        x_lo, x_hi = (lo, hi) if target == "sd" else (scale * (lo - hi), scale * (hi - lo))
        total = int(_get(model_cfg, "num_train_timesteps", 1000))
        sched_kw = dict(num_train_timesteps=total,
                        schedule=str(_get(model_cfg, "beta_schedule", "linear_beta")),
                        beta_start=float(_get(model_cfg, "beta_start", 1e-4)),
                        beta_end=float(_get(model_cfg, "beta_end", 0.02)),
                        clip_sample=True, clip_sample_min=x_lo, clip_sample_max=x_hi)
        if sampler == "ddim":
            steps = int(_get(sample_cfg, "steps", 25))
            if not 1 <= steps <= total:
                raise ConfigError(f"sample.steps={steps}: expected 1..{total}")
            scheduler: Any = DDIMScheduler(**sched_kw)
            scheduler.set_timesteps(steps)
            eta = float(_get(sample_cfg, "eta", 0.0))
        elif sampler == "ddpm":
            scheduler = DDPMScheduler(**sched_kw)
            scheduler.set_timesteps(total)
            eta = 0.0
        else:
            raise ConfigError(f"sample.sampler={sampler!r}: expected ddim or ddpm")

        x = _randn(tuple(ld.shape), generator, device)  # all of x_T first: seed -> same result
        step_gen = _device_generator(generator, device)
        chunk = max(1, int(_get(sample_cfg, "batch_size", 64)))
        out = []
        for i in range(0, ld.shape[0], chunk):
            x_c, ld_c = x[i:i + chunk], ld[i:i + chunk]
            t1_c = None if t1 is None else t1[i:i + chunk]
            for t in scheduler.timesteps.tolist():
                t_vec = torch.full((x_c.shape[0],), t, device=device, dtype=torch.long)
                eps = model(x_c, t_vec, ld_c, t1_c).float()
                if sampler == "ddim":
                    x_c, _ = scheduler.step(eps, t, x_c, eta=eta, generator=step_gen)
                else:
                    x_c, _ = scheduler.step(eps, t, x_c, generator=step_gen)
            out.append(from_x0(x_c, ld_c, model_cfg).clamp(lo, hi))
        return torch.cat(out)
    finally:
        model.train(was_training)
