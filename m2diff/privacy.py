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
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from m2diff.config import ConfigError
from m2diff.train import training_dataset

__all__ = ["accountant_state", "epsilon", "history_of", "make_private", "noise_multiplier",
           "sample_rate", "would_exceed"]

History = list[tuple[float, float, int]]


def sample_rate(num_slices: int, batch_size: int) -> float:
    """The Poisson sample rate Opacus uses for a loader of ``batch_size`` over ``num_slices``."""
    if num_slices <= 0:
        raise ValueError("no training slices")
    return 1.0 / math.ceil(num_slices / max(1, int(batch_size)))


def noise_multiplier(cfg: DictConfig, num_slices: int) -> float:
    """``privacy.noise_multiplier``, or, with ``privacy.target_epsilon`` set, the smallest
    noise that keeps the whole planned federation (``fl.rounds * train.steps`` steps at this
    site's sample rate) within (target_epsilon, delta)."""
    p = cfg.privacy
    target = p.get("target_epsilon")
    if target is not None:
        return float(get_noise_multiplier(
            target_epsilon=float(target), target_delta=float(p.delta),
            sample_rate=sample_rate(num_slices, int(cfg.train.batch_size)),
            steps=int(cfg.fl.rounds) * int(cfg.train.steps), accountant="rdp"))
    if p.get("noise_multiplier") is None:
        raise ConfigError("privacy=dp: set privacy.noise_multiplier or privacy.target_epsilon")
    return float(p.noise_multiplier)


def history_of(state: Mapping[str, Any] | None) -> History:
    """The accountant history held by an ``accountant_state`` dict (empty for None)."""
    return [(float(s), float(q), int(n)) for s, q, n in (state or {}).get("history", [])]


def _accountant(history: Iterable[Sequence[float]]) -> RDPAccountant:
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, slices: Any, cfg: DictConfig,
                 accountant_state: Mapping[str, Any] | None = None,
                 generator: torch.Generator | None = None,
                 ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, PrivacyEngine]:
    """Wrap ``model`` / ``optimizer`` for DP-SGD on ``slices``, continuing the accounting of
    ``accountant_state`` (from ``accountant_state(engine)`` of earlier rounds, or None).

    Returns the GradSampleModule (train it; its bare model is ``unwrap_model``), the
    DPOptimizer (per-sample clipping to ``privacy.max_grad_norm`` and Gaussian noise), the
    Poisson-sampling DPDataLoader of ``training_dataset(slices)`` (pass it to
    ``train_steps(..., loader=)``) and the PrivacyEngine holding the accountant.
    """
    p = cfg.privacy
    if str(p.get("accountant", "rdp")) != "rdp":
        raise ConfigError(f"privacy.accountant={p.accountant}: only rdp is supported")
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
        max_grad_norm=float(p.max_grad_norm), poisson_sampling=True)
    return model, optimizer, dp_loader, engine


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
