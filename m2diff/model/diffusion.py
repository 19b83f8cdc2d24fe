"""Diffusion formulation, training loss and samplers (MONAI DDPM / DDIM schedulers) for all archs
(docs/METHOD.md section 3).

Everything lives in model space (docs/CONTRACTS.md). A *formulation* (``Formulation``, from
``model.formulation`` and the keys that override it) says

- what is diffused, ``target``: ``sd`` (the SD slice itself, the paper's), ``residual``
  (``residual_scale * (SD - LD)``: what LD lacks; the prediction is LD + x_0 / scale) or
  ``residual_norm`` (``(SD - LD) / s`` with s the LD slice's own noise level,
  ``ld_noise_scale``: the residual in units of the LD's noise, so slices of every dose
  have targets of about the same size; the prediction is LD + s x_0);
- what the network predicts, ``prediction``: ``epsilon`` (the noise, the paper's), ``x0``
  (the clean sample) or ``v`` (Salimans & Ho's velocity); passed to MONAI's schedulers as
  their ``prediction_type`` (epsilon | sample | v_prediction);
- where sampling starts, ``start``: ``noise`` (x_T ~ N(0, I), the paper's) or ``ld`` (the
  LD image's own x_0, i.e. LD for target=sd and a zero residual for target=residual,
  noised to ``sample.t0``: SDEdit / CCDF).

Both heads of M2Diff, their consistency term, ddpm_concat and both samplers follow it. The
regression baseline (unet) goes through the same functions: its loss is MSE(pred, SD), its
"sampler" one forward pass. ``training_loss`` and the DP per-slice loss
(m2diff.privacy.PerSampleGrads) are built from the same pieces (``draw``, ``diffusion_pair``,
``loss_terms``, ``weighted_loss``), so the two cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from m2diff.config import ConfigError
from m2diff.model import unwrap_model
from m2diff.model.mri_keep import draw_keep

DEFAULT_CLIP = (-1.0, 3.0)  # model space: -1 is zero activity; SD may exceed the LD p99.5 scale
# Our names -> MONAI's prediction_type.
PREDICTIONS = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
TARGETS = ("sd", "residual", "residual_norm")
STARTS = ("noise", "ld")
HEAD_TERMS = ("mse_pet", "mse_mri", "consistency")


@dataclass(frozen=True)
class Formulation:
    """What the diffusion generates and predicts, and where sampling starts (module doc)."""

    name: str
    prediction: str  # epsilon | x0 | v
    target: str  # sd | residual
    residual_scale: float
    start: str  # noise | ld

    @property
    def monai_prediction(self) -> str:
        return PREDICTIONS[self.prediction]


# The named formulations. "paper" is arXiv 2603.09075's: noise prediction of the SD image,
# sampled from pure noise. "enhance" is the product's default, chosen by measurement
# (README "The model"): the clean residual SD - LD in units of the LD slice's noise level is
# predicted (a zero residual is LD itself, so an untrained model returns its input);
# starting from a noised zero residual at t0 < T (start=ld) measured no better than from T.
FORMULATIONS: dict[str, Formulation] = {
    "enhance": Formulation("enhance", "x0", "residual_norm", 4.0, "noise"),
    "paper": Formulation("paper", "epsilon", "sd", 1.0, "noise"),
}


def _get(cfg: Any, key: str, default: Any) -> Any:
    value = cfg.get(key, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else default
    return default if value is None else value


def formulation(model_cfg: Any) -> Formulation:
    """The formulation a model config asks for: ``model.formulation`` (enhance | paper),
    with ``model.prediction`` / ``model.target`` / ``model.residual_scale`` overriding it
    when set (not null).

    A config without ``formulation`` and ``prediction`` is one from before formulations
    existed (every checkpoint written until then): noise prediction of its ``target``
    (default sd), sampled from noise, i.e. what it was trained with.
    """
    name = model_cfg.get("formulation") if hasattr(model_cfg, "get") else None
    if name is None:
        base = FORMULATIONS["paper"]
        name = "legacy" if _get(model_cfg, "prediction", None) is None else "custom"
    else:
        name = str(name).lower()
        if name not in FORMULATIONS:
            raise ConfigError(f"model.formulation={name!r}: expected one of {', '.join(FORMULATIONS)}")
        base = FORMULATIONS[name]
    prediction = str(_get(model_cfg, "prediction", base.prediction)).lower()
    if prediction not in PREDICTIONS:
        raise ConfigError(f"model.prediction={prediction!r}: expected one of {', '.join(PREDICTIONS)}")
    target = str(_get(model_cfg, "target", base.target)).lower()
    if target not in TARGETS:
        raise ConfigError(f"model.target={target!r}: expected one of {', '.join(TARGETS)}")
    scale = float(_get(model_cfg, "residual_scale", base.residual_scale))
    if not scale > 0:
        raise ConfigError(f"model.residual_scale={scale}: must be > 0")
    start = str(_get(model_cfg, "sample_start", base.start)).lower()
    if start not in STARTS:
        raise ConfigError(f"model.sample_start={start!r}: expected noise or ld")
    return Formulation(str(name), prediction, target, scale, start)


def resolved_formulation(model_cfg: Any) -> dict[str, Any]:
    """The model config keys that pin the formulation explicitly (what a checkpoint stores,
    so a later change of a named formulation's defaults cannot change how it is read)."""
    f = formulation(model_cfg)
    return {"formulation": f.name if f.name in FORMULATIONS else None, "prediction": f.prediction,
            "target": f.target, "residual_scale": f.residual_scale, "sample_start": f.start}


def _schedule_kwargs(model_cfg: Any) -> dict[str, Any]:
    return dict(num_train_timesteps=int(_get(model_cfg, "num_train_timesteps", 1000)),
                schedule=str(_get(model_cfg, "beta_schedule", "linear_beta")),
                beta_start=float(_get(model_cfg, "beta_start", 1e-4)),
                beta_end=float(_get(model_cfg, "beta_end", 0.02)))


def make_scheduler(model_cfg: Any) -> DDPMScheduler:
    """The training (forward-process) scheduler: ``num_train_timesteps`` (1000), linear betas,
    the formulation's prediction type."""
    return DDPMScheduler(**_schedule_kwargs(model_cfg),
                         prediction_type=formulation(model_cfg).monai_prediction)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """N(0, 1) on ``device``, drawn from ``generator`` wherever that lives (CPU or CUDA)."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


@dataclass
class Draws:
    """The random draws of one minibatch: ``keep`` (B,) bool MRI kept, or None (eval mode
    without a has_t1 flag: every slice keeps its MRI); diffusion models also ``t`` (B, K)
    timesteps and ``noise`` (B, K, C, H, W), K draws per slice (K = 1 outside DP's noise
    multiplicity)."""

    keep: Tensor | None
    t: Tensor | None = None
    noise: Tensor | None = None


def draw(model: nn.Module, batch: Mapping[str, Tensor | None], scheduler: Any,
         generator: torch.Generator | None = None, k: int = 1) -> Draws:
    """The minibatch's draws from ``generator``, in this order: MRI keep (training mode only,
    p(drop) = ``mri_dropout``; slices whose subject has no T1, ``batch["has_t1"]`` False,
    never keep it), noise, timesteps (uniform over the training schedule)."""
    bare = unwrap_model(model)
    ld, t1 = batch["ld"], batch.get("t1")
    assert ld is not None
    device, size = ld.device, ld.shape[0]
    keep = draw_keep(float(getattr(bare, "mri_dropout", 0.0)), size, device, generator) \
        if bare.training else None
    has_t1 = batch.get("has_t1")
    if has_t1 is not None and t1 is not None:
        has_t1 = has_t1.to(device=device, dtype=torch.bool)
        keep = has_t1 if keep is None else keep & has_t1
    if not bare.is_diffusion:
        return Draws(keep)
    noise = _randn((size, k, *ld.shape[1:]), generator, device)
    steps = int(scheduler.num_train_timesteps)
    if generator is None:
        t = torch.randint(0, steps, (size, k), device=device)
    else:
        t = torch.randint(0, steps, (size, k), generator=generator, device=generator.device).to(device)
    return Draws(keep, t, noise)


def diffusion_pair(sd: Tensor, ld: Tensor, model_cfg: Any, scheduler: Any, noise: Tensor,
                   t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, what the network must output) for SD / LD slices (B, C, H, W) and K draws per
    slice: ``noise`` (B, K, C, H, W), ``t`` (B, K). Both returned as (B, K, C, H, W).

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with x_0 = ``to_x0(sd, ld)``; the output target is
    eps (epsilon), x_0 (x0) or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (v; MONAI's get_velocity).
    """
    pred = formulation(model_cfg).prediction
    x0 = to_x0(sd, ld, model_cfg)[:, None].expand_as(noise)
    flat = (-1, *noise.shape[2:])
    x0_f, noise_f, t_f = x0.reshape(flat), noise.reshape(flat), t.reshape(-1)
    x_t = scheduler.add_noise(original_samples=x0_f, noise=noise_f, timesteps=t_f)
    if pred == "epsilon":
        target = noise_f
    elif pred == "x0":
        target = x0_f
    else:
        target = scheduler.get_velocity(x0_f, noise_f, t_f)
    return x_t.reshape(noise.shape), target.reshape(noise.shape)


def loss_terms(outputs: Sequence[Tensor], target: Tensor) -> Tensor:
    """The loss terms of one forward: two heads -> [MSE(pet, target), MSE(mri, target),
    MSE(pet, mri)] (the paper's multi-task loss, whatever the heads predict); one output ->
    [MSE(out, target)]. Each MSE is a mean over all elements."""
    if len(outputs) == 2:
        pet, mri = outputs
        return torch.stack([F.mse_loss(pet, target), F.mse_loss(mri, target), F.mse_loss(pet, mri)])
    return F.mse_loss(outputs[0], target)[None]


def loss_weights(model_cfg: Any) -> list[float]:
    weights = [float(w) for w in _get(model_cfg, "loss_weights", (0.4, 0.4, 0.2))]
    if len(weights) != 3:
        raise ConfigError(f"model.loss_weights={weights}: expected 3 weights (pet, mri, consistency)")
    return weights


def weighted_loss(terms: Tensor, model_cfg: Any) -> Tensor:
    """The scalar loss of ``loss_terms``: weighted by ``model.loss_weights`` for two heads."""
    if terms.shape[0] == 1:
        return terms[0]
    w = torch.tensor(loss_weights(model_cfg), device=terms.device, dtype=terms.dtype)
    return (w * terms).sum()


def term_names(model: nn.Module) -> tuple[str, ...]:
    return HEAD_TERMS if hasattr(unwrap_model(model), "forward_heads") else ("loss",)


def training_loss(model: nn.Module, batch: Mapping[str, Tensor | None], model_cfg: Any,
                  scheduler: DDPMScheduler | None, generator: torch.Generator | None = None,
                  ) -> tuple[Tensor, dict[str, float]]:
    """One minibatch loss. batch: {"ld", "t1" (may be None/absent), "sd"}, each (B, 1, H, W),
    and optionally "has_t1" (B,) bool: slices of subjects without a T1 always train MRI-free.

    m2diff: w0 * MSE(out_pet, y) + w1 * MSE(out_mri, y) + w2 * MSE(out_pet, out_mri) with
    w = model.loss_weights and y the formulation's target (``diffusion_pair``); ddpm_concat:
    MSE(out, y); unet: MSE(pred, sd). Each MSE is a mean over all elements, i.e. a mean of
    per-sample means (what Opacus' loss_reduction="mean" assumes). Noise, timesteps and MRI
    dropout come from ``generator`` (``draw``). Returns the loss (graph attached) and float logs.
    """
    ld, sd, t1 = batch["ld"], batch["sd"], batch.get("t1")
    if sd is None:
        raise ValueError("training needs SD slices (batch['sd'] is None)")
    bare = unwrap_model(model)
    if bare.is_diffusion:
        scheduler = scheduler or make_scheduler(model_cfg)
        formulation(model_cfg)  # a bad formulation fails before any draw
    draws = draw(model, batch, scheduler, generator)
    keep = draws.keep
    if not bare.is_diffusion:
        outputs: tuple[Tensor, ...] = (model(ld, t1, mri_keep=keep),)
        target = sd
    else:
        assert draws.noise is not None and draws.t is not None
        x_t, target = diffusion_pair(sd, ld, model_cfg, scheduler, draws.noise, draws.t)
        x_t, target, t = x_t[:, 0], target[:, 0], draws.t[:, 0]
        if hasattr(bare, "forward_heads"):
            # Opacus' GradSampleModule only hooks forward(); reach forward_heads through it.
            heads = model.forward_heads if hasattr(model, "forward_heads") else bare.forward_heads
            outputs = tuple(heads(x_t, t, ld, t1, mri_keep=keep))
        else:
            outputs = (model(x_t, t, ld, t1, mri_keep=keep),)
    terms = loss_terms(outputs, target)
    loss = weighted_loss(terms, model_cfg)
    logs = dict(zip(term_names(model), terms.detach().float().tolist(), strict=True))
    logs["loss"] = float(loss.detach())
    return loss, logs


def diffusion_target(model_cfg: Any) -> tuple[str, float]:
    """(target, residual_scale) of the formulation: what the diffusion generates."""
    f = formulation(model_cfg)
    return f.target, f.residual_scale


NOISE_FLOOR = 0.01  # smallest LD noise level residual_norm divides by (model space)


def ld_noise_scale(ld: Tensor) -> Tensor:
    """(B, 1, 1, 1) noise level of LD slices (B, 1, H, W), at least ``NOISE_FLOOR``:
    exp(``m2diff.model.m2diff.ld_noise_level``)."""
    from m2diff.model.m2diff import ld_noise_level

    return ld_noise_level(ld).exp().clamp_min(NOISE_FLOOR).view(-1, 1, 1, 1)


def to_x0(sd: Tensor, ld: Tensor, model_cfg: Any) -> Tensor:
    """The diffused sample x_0 for SD slices (B, 1, H, W) in model space."""
    target, scale = diffusion_target(model_cfg)
    if target == "sd":
        return sd
    if target == "residual_norm":
        return (sd - ld) / ld_noise_scale(ld)
    return scale * (sd - ld)


def from_x0(x0: Tensor, ld: Tensor, model_cfg: Any) -> Tensor:
    """SD slices in model space from a sampled x_0; inverse of ``to_x0``."""
    target, scale = diffusion_target(model_cfg)
    if target == "sd":
        return x0
    if target == "residual_norm":
        return ld + x0 * ld_noise_scale(ld)
    return ld + x0 / scale


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` derived from ``generator`` (MONAI's step draws noise there)."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def start_timestep(sample_cfg: Any, total: int, start: str) -> int:
    """The timestep sampling starts at: T - 1 from noise; round(``sample.t0`` * (T - 1)) from
    LD (``sample.t0`` a fraction in (0, 1])."""
    if start == "noise":
        return total - 1
    frac = float(_get(sample_cfg, "t0", 1.0))
    if not 0 < frac <= 1:
        raise ConfigError(f"sample.t0={frac}: expected a fraction of the schedule in (0, 1]")
    return max(0, min(total - 1, round(frac * (total - 1))))


def ddim_timesteps(total: int, steps: int, t0: int) -> tuple[list[int], int]:
    """``steps`` equally spaced DDIM timesteps from ``t0`` down, and the
    ``num_inference_steps`` to give MONAI's DDIMScheduler for them.

    MONAI's DDIMScheduler.set_timesteps lays its timesteps out with linspace(T - 1, 0, N),
    but its ``step`` goes from t to t - T // N: for most N (2, 3, 6, 7, ...) the next model
    call then sees a sample of another noise level than its timestep says (N = 2: the step
    from 999 lands at 499, the next call is told t = 0). Here the spacing is d = T // n for
    an integer n, so step's own t - d is exactly the next timestep; the caller keeps the
    last step's x_0 estimate (the final alpha is then irrelevant).
    """
    if steps == 1:
        return [t0], total
    n = max(steps, math.ceil(total * steps / (t0 + 1)))
    d = total // n
    return [t0 - i * d for i in range(steps)], n


@torch.inference_mode()
def predict_sd(model: nn.Module, ld: Tensor, t1: Tensor | None, model_cfg: Any, sample_cfg: Any,
               generator: torch.Generator | None = None) -> Tensor:
    """Predict SD slices in model space: ld, t1 (B, 1, H, W) (t1 may be None) -> (B, 1, H, W).

    Diffusion models: ``sample.start`` (auto = the formulation's; noise: x_T ~ N(0, I); ld:
    the LD image's x_0 noised to ``sample.t0``), then ``sample.sampler`` ddim
    (``sample.steps`` equally spaced steps, ``sample.eta``; default) or ddpm (every timestep
    from the start down), ``sample.batch_size`` slices denoised together, every x_0 estimate
    clipped to ``sample.clip``; the result is the last step's x_0 estimate. ``sample.mri:
    false`` ignores t1 (MRI-free). Deterministic for a given ``generator`` state. Runs on ld's
    device, in eval mode (the model's mode is restored afterwards).
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
        form = formulation(model_cfg)
        sampler = str(_get(sample_cfg, "sampler", "ddim")).lower()
        start = str(_get(sample_cfg, "start", "auto")).lower()
        start = form.start if start == "auto" else start
        if start not in STARTS:
            raise ConfigError(f"sample.start={start!r}: expected auto, noise or ld")
        # x_0 estimates are clipped where SD = LD + x_0 / scale can still land inside [lo, hi].
        scale = {"sd": 1.0, "residual": form.residual_scale, "residual_norm": 1 / NOISE_FLOOR}[form.target]
        x_lo, x_hi = (lo, hi) if form.target == "sd" else (scale * (lo - hi), scale * (hi - lo))
        kw = dict(**_schedule_kwargs(model_cfg), clip_sample=True, clip_sample_min=x_lo,
                  clip_sample_max=x_hi, prediction_type=form.monai_prediction)
        total = int(kw["num_train_timesteps"])
        t0 = start_timestep(sample_cfg, total, start)
        if sampler == "ddim":
            steps = int(_get(sample_cfg, "steps", 25))
            if not 1 <= steps <= t0 + 1:
                raise ConfigError(f"sample.steps={steps}: expected 1..{t0 + 1} (timesteps from "
                                  f"the start, t0 = {t0})")
            scheduler: Any = DDIMScheduler(**kw)
            timesteps, scheduler.num_inference_steps = ddim_timesteps(total, steps, t0)
            eta = float(_get(sample_cfg, "eta", 0.0))
        elif sampler == "ddpm":
            scheduler = DDPMScheduler(**kw)
            timesteps, eta = list(range(t0, -1, -1)), 0.0
        else:
            raise ConfigError(f"sample.sampler={sampler!r}: expected ddim or ddpm")

        x = _randn(tuple(ld.shape), generator, device)  # all of the start noise first: seed -> same result
        if start == "ld":
            t_start = torch.full((ld.shape[0],), t0, device=device, dtype=torch.long)
            x = scheduler.add_noise(to_x0(ld, ld, model_cfg), x, t_start)
        step_gen = _device_generator(generator, device)
        chunk = max(1, int(_get(sample_cfg, "batch_size", 64)))
        out = []
        for i in range(0, ld.shape[0], chunk):
            x_c, ld_c = x[i:i + chunk], ld[i:i + chunk]
            t1_c = None if t1 is None else t1[i:i + chunk]
            x0 = x_c
            for t in timesteps:
                t_vec = torch.full((x_c.shape[0],), t, device=device, dtype=torch.long)
                pred = model(x_c, t_vec, ld_c, t1_c).float()
                if sampler == "ddim":
                    x_c, x0 = scheduler.step(pred, t, x_c, eta=eta, generator=step_gen)
                else:
                    x_c, x0 = scheduler.step(pred, t, x_c, generator=step_gen)
            out.append(from_x0(x0, ld_c, model_cfg).clamp(lo, hi))
        return torch.cat(out)
    finally:
        model.train(was_training)
