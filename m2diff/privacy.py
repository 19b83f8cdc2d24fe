"""Sample-level differential privacy for local training: Opacus DP-SGD with Poisson sampling
and an RDP accountant whose state survives between federated rounds.

Flower-free: the ClientApp (client/privacy.py) keeps the accountant state on the site's disk
and calls these functions; ``cfg.privacy`` (conf/privacy/dp.yaml) holds the settings.

What is accounted: every DP-SGD step of the site's local training, as a Poisson-subsampled
Gaussian mechanism on that site's training slices (one slice = one record; slices of one
subject are *not* grouped, so this is slice-level, not subject-level, privacy). The sample
rate is Opacus' ``1 / ceil(N / batch_size)`` (about ``batch_size / N``).

Accountant state: the RDP accountant's ``history``, a list of ``(noise_multiplier,
sample_rate, steps)`` entries, is all it needs; ``accountant_state`` / ``make_private``
export and restore it as plain JSON-able data.

Noise multiplicity (``privacy.noise_multiplicity: K``, DPDM, Dockhorn et al. 2023): with
K > 1 each slice's loss is the mean over K independent (timestep, noise) draws *before* its
gradient is clipped, so one slice still contributes one clipped gradient per step and the
privacy cost (noise, sample rate, steps) is exactly that of K = 1; only the gradient's
variance falls. Those per-slice gradients come from ``PerSampleGrads`` (torch.func: vmap of
grad of one slice's loss over the bare model) and are handed to Opacus' DPOptimizer as
``p.grad_sample`` (Opacus' "no_op" GradSampleModule: no hooks), which clips, adds noise and
steps the accountant as it does for its own hooks. K = 1 keeps Opacus' hooks.

Empty batches: Poisson sampling can draw no slice at all. Opacus 1.6's DPDataLoader cannot
collate an empty *first* batch of dict items (it builds ``torch.zeros(..., dtype=str)``), so
``make_private`` primes its collate function with the batch structure; ``train_steps`` then
runs no forward for an empty batch and lets the DPOptimizer take a noise-only step, which the
accountant counts (Opacus' semantics).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import CollateFnWithEmpty
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, default_collate

from m2diff.config import ConfigError
from m2diff.model import unwrap_model
from m2diff.model.diffusion import (
    Draws,
    diffusion_pair,
    draw,
    loss_terms,
    loss_weights,
    term_names,
    weighted_loss,
)
from m2diff.model.mri_keep import keep_all
from m2diff.train import training_dataset

__all__ = ["Draws", "PerSampleGrads", "accountant_state", "epsilon", "history_of",
           "make_private", "noise_multiplicity", "noise_multiplier", "sample_rate",
           "would_exceed"]

History = list[tuple[float, float, int]]


def sample_rate(num_slices: int, batch_size: int) -> float:
    """The Poisson sample rate Opacus uses for a loader of ``batch_size`` over ``num_slices``."""
    if num_slices <= 0:
        raise ValueError("no training slices")
    return 1.0 / math.ceil(num_slices / max(1, int(batch_size)))


def noise_multiplier(cfg: DictConfig, num_slices: int) -> float:
    """``privacy.noise_multiplier`` when set, else the smallest noise that keeps the whole
    planned federation (``fl.rounds * train.steps`` steps at this site's sample rate) within
    (``privacy.target_epsilon``, ``privacy.delta``): the default (conf/privacy/dp.yaml), so
    that a DP run trains every planned round instead of running out of budget in the first."""
    p = cfg.privacy
    if p.get("noise_multiplier") is not None:
        return float(p.noise_multiplier)
    target = p.get("target_epsilon")
    if target is None:
        raise ConfigError("privacy=dp: set privacy.noise_multiplier or privacy.target_epsilon")
    steps = int(cfg.fl.get("rounds", 1)) * int(cfg.train.steps)
    if steps <= 0:
        raise ConfigError("privacy.target_epsilon: fl.rounds x train.steps must be positive")
    return float(get_noise_multiplier(
        target_epsilon=float(target), target_delta=float(p.delta),
        sample_rate=sample_rate(num_slices, int(cfg.train.batch_size)),
        steps=steps, accountant="rdp"))


def noise_multiplicity(cfg: DictConfig) -> int:
    """``privacy.noise_multiplicity`` (K >= 1; 1 when absent)."""
    k = cfg.privacy.get("noise_multiplicity", 1)
    k = 1 if k is None else k
    if int(k) != k or int(k) < 1:
        raise ConfigError(f"privacy.noise_multiplicity={k}: expected an integer >= 1")
    return int(k)


def history_of(state: Mapping[str, Any] | None) -> History:
    """The accountant history held by an ``accountant_state`` dict (empty for None)."""
    return [(float(s), float(q), int(n)) for s, q, n in (state or {}).get("history", [])]


def _accountant(history: Iterable[Sequence[float]]) -> RDPAccountant:
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, slices: Any, cfg: DictConfig,
                 accountant_state: Mapping[str, Any] | None = None,
                 generator: torch.Generator | None = None, functional: bool | None = None,
                 ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, PrivacyEngine]:
    """Wrap ``model`` / ``optimizer`` for DP-SGD on ``slices``, continuing the accounting of
    ``accountant_state`` (from ``accountant_state(engine)`` of earlier rounds, or None).

    Returns the GradSampleModule (train it; its bare model is ``unwrap_model``), the
    DPOptimizer (per-sample clipping to ``privacy.max_grad_norm`` and Gaussian noise), the
    Poisson-sampling DPDataLoader of ``training_dataset(slices)`` (pass it to
    ``train_steps(..., loader=)``) and the PrivacyEngine holding the accountant.

    Per-sample gradients: Opacus' hooks when ``privacy.noise_multiplicity`` is 1, else
    ``PerSampleGrads`` (torch.func), attached to the returned module as ``grad_sample_step``
    (train_steps calls it instead of ``loss.backward()``). ``functional=True`` forces the
    torch.func path at K = 1 (tests, benchmark); accounting is the same either way.
    """
    p = cfg.privacy
    if str(p.get("accountant", "rdp")) != "rdp":
        raise ConfigError(f"privacy.accountant={p.accountant}: only rdp is supported")
    k = noise_multiplicity(cfg)
    functional = k > 1 if functional is None else bool(functional)
    if k > 1 and not getattr(model, "is_diffusion", False):
        raise ConfigError(f"privacy.noise_multiplicity={k}: model {cfg.model.arch} has no "
                          "(timestep, noise) draws to average; use 1")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model {cfg.model.arch} cannot train with Opacus: {errors[:3]}")
    dataset = training_dataset(slices)
    if len(dataset) == 0:
        raise ValueError("no training slices")
    loader = DataLoader(dataset, batch_size=int(cfg.train.batch_size),
                        num_workers=int(cfg.train.get("num_workers", 0)), generator=generator)
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = history_of(accountant_state)
    model, optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier(cfg, len(dataset)),
        max_grad_norm=float(p.max_grad_norm), poisson_sampling=True,
        grad_sample_mode="no_op" if functional else "hooks")
    if isinstance(dp_loader.collate_fn, CollateFnWithEmpty):
        # Opacus builds an empty *first* batch with torch.zeros(dtype=str) for dict items and
        # fails; with the structure known it yields zero-length tensors of the right shapes.
        dp_loader.collate_fn.first_batch = default_collate([dataset[0]])
    if functional:
        model.grad_sample_step = PerSampleGrads(model, k)
    return model, optimizer, dp_loader, engine


class _Heads(nn.Module):
    """What one slice's loss needs from the model: both heads (M2Diff), the one head
    (ddpm_concat) or the prediction (unet), as a tuple; mri_keep passed explicitly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, *args: Tensor | None, keep: Tensor | None = None) -> tuple[Tensor, ...]:
        if hasattr(self.m, "forward_heads"):
            return tuple(self.m.forward_heads(*args, mri_keep=keep))
        return (self.m(*args, mri_keep=keep),)


class PerSampleGrads:
    """Per-slice gradients of the training loss with torch.func, for Opacus' DPOptimizer.

    ``grads(batch, model_cfg, scheduler, draws)`` is ``vmap(grad(one slice's loss))`` over
    the batch, with ``functional_call`` on the bare model. One slice's loss is that of
    ``m2diff.model.diffusion.training_loss`` for a batch of that slice alone, built from the
    same pieces (``diffusion_pair`` for x_t and the formulation's target, ``loss_terms``,
    ``weighted_loss``), averaged over its K (timestep, noise) draws (each MSE is a mean over
    K x C x H x W elements, i.e. the mean of the K single-draw losses). Nothing mixes slices
    of a batch.

    Called as ``step(batch, model_cfg, scheduler, generator)`` (what train_steps does) it
    draws with ``generator`` through ``diffusion.draw`` (at K = 1 the very numbers
    training_loss draws), stores the gradients as ``p.grad_sample`` and returns
    training_loss' logs (batch means).
    """

    def __init__(self, model: nn.Module, multiplicity: int = 1) -> None:
        self.bare = unwrap_model(model)
        self.k = int(multiplicity)
        self.heads = _Heads(self.bare)

    def draws(self, batch: Mapping[str, Tensor | None], model_cfg: Any, scheduler: Any,
              generator: torch.Generator | None) -> Draws:
        del model_cfg
        return draw(self.bare, batch, scheduler, generator, self.k)

    def _params(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = {n: p.detach() for n, p in self.heads.named_parameters() if p.requires_grad}
        buffers = {n: b.detach() for n, b in self.heads.named_buffers()}
        return params, buffers

    def grads(self, batch: Mapping[str, Tensor | None], model_cfg: Any, scheduler: Any,
              draws: Draws) -> tuple[dict[str, Tensor], Tensor, tuple[str, ...]]:
        """Per-slice gradients {parameter name (of the bare model): (B, *shape)}, per-slice
        loss terms (B, n) and their names."""
        ld, sd, t1 = batch["ld"], batch["sd"], batch.get("t1")
        assert ld is not None and sd is not None
        size = ld.shape[0]
        keep = draws.keep
        if keep is None:
            keep = keep_all(size, ld.device)
        params, buffers = self._params()
        diffusion = bool(self.bare.is_diffusion)
        if diffusion:
            assert draws.t is not None and draws.noise is not None
            x_t, target = diffusion_pair(sd, ld, model_cfg, scheduler, draws.noise, draws.t)
            t = draws.t
        else:
            x_t, t, target = ld[:, None], None, sd[:, None]  # one "draw": the slice itself
        loss_weights(model_cfg)  # a bad setting fails here, not inside vmap
        heads = self.heads

        def one(p: dict[str, Tensor], x_t: Tensor, t: Tensor | None, ld: Tensor,
                t1: Tensor | None, keep: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
            n = x_t.shape[0]  # K draws of this slice, run as a batch of K
            ld_k = ld.expand(n, *ld.shape)
            t1_k = None if t1 is None else t1.expand(n, *t1.shape)
            args = (x_t, t, ld_k, t1_k) if diffusion else (ld_k, t1_k)
            out = functional_call(heads, (p, buffers), args, {"keep": keep.expand(n)})
            terms = loss_terms(out, target)
            return weighted_loss(terms, model_cfg), terms.detach()

        in_dims = (None, 0, None if t is None else 0, 0, None if t1 is None else 0, 0, 0)
        per_slice = vmap(grad(one, has_aux=True), in_dims=in_dims, randomness="different")
        grads, terms = per_slice(params, x_t, t, ld, t1, keep, target)
        # "m." is _Heads' prefix: back to the bare model's names.
        return {n[2:]: g for n, g in grads.items()}, terms, term_names(self.bare)

    def __call__(self, batch: Mapping[str, Tensor | None], model_cfg: Any, scheduler: Any,
                 generator: torch.Generator | None = None) -> dict[str, float]:
        draws = self.draws(batch, model_cfg, scheduler, generator)
        grads, terms, names = self.grads(batch, model_cfg, scheduler, draws)
        for name, p in self.bare.named_parameters():
            if p.requires_grad:
                p.grad_sample = grads[name]
        means = terms.mean(dim=0)
        logs = dict(zip(names, means.float().tolist(), strict=True))
        logs["loss"] = float(weighted_loss(means, model_cfg))
        return logs


def epsilon(engine: PrivacyEngine | RDPAccountant | Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon spent so far at ``delta`` (0.0 before any step). Takes an engine, an RDP
    accountant or a history list."""
    acc = (engine.accountant if isinstance(engine, PrivacyEngine) else
           engine if isinstance(engine, RDPAccountant) else _accountant(engine))
    if not acc.history:
        return 0.0
    return float(acc.get_epsilon(delta=float(delta)))


def accountant_state(engine: PrivacyEngine) -> dict[str, Any]:
    """JSON-able state of the engine's RDP accountant: ``{"accountant": "rdp", "history": [...]}``."""
    return {"accountant": "rdp",
            "history": [[float(s), float(q), int(n)] for s, q, n in engine.accountant.history]}


def would_exceed(history: Iterable[Sequence[float]], noise: float, rate: float, steps: int,
                 delta: float, budget: float | None) -> bool:
    """Whether ``steps`` more DP-SGD steps at (``noise``, ``rate``) after ``history`` would take
    epsilon at ``delta`` above ``budget`` (None: no budget, never)."""
    if budget is None:
        return False
    acc = _accountant(history)
    acc.history.append((float(noise), float(rate), int(steps)))
    return float(acc.get_epsilon(delta=float(delta))) > float(budget)
