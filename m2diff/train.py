"""Training: ``train_steps``, the one loop of local, centralised and federated training
(``m2diff train``, ``m2diff simulate``, the ClientApp, DP-SGD), with its EMA, optimiser and
minibatches. The ``m2diff train`` command is m2diff/train_command.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import Progress
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from m2diff.checkpoint import clean_state_dict
from m2diff.config import ConfigError
from m2diff.device import resolve_device
from m2diff.model import unwrap_model
from m2diff.model.diffusion import make_scheduler, training_loss
from m2diff.progress import progress_bar

__all__ = ["EMA", "TrainResult", "make_optimizer", "progress_bar_with_loss", "train_steps",
           "training_dataset"]



@dataclass
class TrainResult:
    """What one ``train_steps`` call did.

    ``num_examples`` is ``len(slices)``, the site's number of training slices: the FedAvg
    weight (slices *seen* would be steps * batch_size, the same for every site).
    """

    loss: float  # mean of ``losses``
    num_examples: int
    steps: int  # optimiser steps taken
    seconds: float
    # One per step that had slices (a DP step on an empty Poisson batch has no loss).
    losses: list[float] = field(default_factory=list)
    logs: dict[str, float] = field(default_factory=dict)  # per-term means (mse_pet, ...)
    optimizer: torch.optim.Optimizer | None = None  # to continue with the same state
    ema: EMA | None = None


class EMA:
    """Exponential moving average of a model's weights, kept as a state dict (``shadow``)
    beside the model: no module copy, so nothing of an Opacus wrapper (hooks, per-sample
    gradients) is duplicated.

    Uses the usual warm-up ``min(decay, (1 + n) / (10 + n))``: with a plain 0.999 a few hundred
    steps (a federated round) would leave the average mostly at the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        n = self.num_updates
        decay = min(self.decay, (1 + n) / (10 + n))
        for key, value in unwrap_model(model).state_dict().items():
            avg = self.shadow[key]
            if avg.dtype.is_floating_point:
                avg.lerp_(value.detach().to(avg.dtype), 1.0 - decay)
            else:
                avg.copy_(value)

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into ``model`` (e.g. a fresh one for evaluation)."""
        unwrap_model(model).load_state_dict(self.shadow)
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "model": clean_state_dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        device = next(iter(self.shadow.values())).device if self.shadow else "cpu"
        self.shadow = {k: v.to(device).clone() for k, v in state["model"].items()}


def make_optimizer(model: nn.Module, train_cfg: Any) -> torch.optim.Optimizer:
    """Adam or AdamW (``train.optimizer``) with ``train.lr`` and ``train.weight_decay``."""
    name = str(train_cfg.get("optimizer", "adam")).lower()
    kwargs = dict(lr=float(train_cfg.lr), weight_decay=float(train_cfg.get("weight_decay", 0.0)))
    if name == "adam":
        return torch.optim.Adam(model.parameters(), **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **kwargs)
    raise ConfigError(f"train.optimizer={name!r}: expected adam or adamw")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0]
               % 2**63)


class _WithT1Flag(Dataset):
    """Adds "has_t1" (bool) to each item, so subjects without a T1 train MRI-free."""

    def __init__(self, base: Dataset, has_t1: np.ndarray) -> None:
        self.base, self.has_t1 = base, has_t1

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {**self.base[i], "has_t1": torch.tensor(bool(self.has_t1[i]))}


def training_dataset(slices: Any) -> Dataset:
    """The map-style dataset ``train_steps`` draws from: ``slices.torch_dataset()``, plus a
    "has_t1" flag per item when only some subjects have a T1."""
    dataset = slices.torch_dataset()
    has_t1 = getattr(slices, "has_t1", None)
    if getattr(slices, "t1", None) is not None and has_t1 is not None and not np.all(has_t1):
        dataset = _WithT1Flag(dataset, np.asarray(has_t1))
    return dataset


def _loader_batches(loader: Iterable[dict[str, Tensor]], steps: int) -> Iterator[dict[str, Tensor]]:
    """``steps`` batches from ``loader``, starting a new pass whenever one ends."""
    done = 0
    while done < steps:
        before = done
        for batch in loader:
            yield batch
            done += 1
            if done >= steps:
                return
        if done == before:
            raise ValueError("no training slices")


def _batches(slices: Any, batch_size: int, steps: int, seed: int, num_workers: int,
             pin: bool) -> Iterator[dict[str, Tensor]]:
    """``steps`` random minibatches: shuffled epochs of ``slices.torch_dataset()`` (seeded)."""
    dataset = training_dataset(slices)
    if len(dataset) == 0:
        raise ValueError("no training slices")
    sampler = RandomSampler(dataset, num_samples=steps * batch_size,
                            generator=torch.Generator().manual_seed(seed))
    yield from DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          num_workers=num_workers, pin_memory=pin)


def _empty(batch: Any) -> bool:
    """A batch without slices (Opacus' Poisson sampling: [] or zero-length tensors)."""
    if not batch:
        return True
    ld = batch.get("ld") if isinstance(batch, Mapping) else None
    return ld is not None and ld.shape[0] == 0


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """A DPOptimizer step on an empty batch: zero per-sample gradients, so the update is the
    Gaussian noise alone, and the accountant counts the step."""
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:  # type: ignore[attr-defined]
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()


def _amp(device: torch.device, enabled: bool) -> torch.dtype | None:
    if device.type != "cuda" or not enabled:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def progress_bar_with_loss() -> Progress:
    """The training bar: steps done and the last minibatch's loss."""
    return progress_bar("loss {task.fields[loss]:.4f}")


def train_steps(model: nn.Module, slices: Any, cfg: DictConfig, steps: int,
                optimizer: torch.optim.Optimizer | None = None, ema: EMA | None = None,
                device: torch.device | str | None = None, progress: bool | Progress = True,
                step_offset: int | None = None,
                loader: Iterable[dict[str, Tensor]] | None = None) -> TrainResult:
    """Train ``model`` in place for ``steps`` optimiser steps on random minibatches of ``slices``.

    - batches of ``train.batch_size`` slices from ``slices.torch_dataset()``, shuffled per epoch;
      batch order, noise, timesteps and MRI dropout are seeded by (``cfg.seed``, ``step_offset``);
      ``step_offset=None`` draws the offset from torch's global RNG, so a caller that seeds it
      (``torch.manual_seed(seed * 1000 + round)``) gets different, reproducible rounds;
    - ``optimizer`` defaults to ``make_optimizer(model, cfg.train)``; gradients are clipped to
      ``train.grad_clip`` (except under an Opacus DPOptimizer, which clips per sample);
    - on CUDA only: autocast (bf16, else fp16 with loss scaling) when ``train.amp`` and
      channels_last when ``train.channels_last``;
    - ``loader`` (e.g. Opacus' Poisson-sampling DPDataLoader over ``training_dataset(slices)``)
      replaces the built-in batches: ``steps`` batches are taken from it, pass after pass;
      under a DPOptimizer an empty batch runs no forward and takes a noise-only step (counted
      by the accountant); a model carrying ``grad_sample_step`` (m2diff.privacy.make_private
      with privacy.noise_multiplicity > 1) computes its own per-sample gradients;
    - ``ema`` is updated after each step; with ``ema=None`` and ``train.ema_decay > 0`` a new
      one starts from the current weights (returned in the result).
    The model stays on ``device`` (default ``cfg.device``) in train mode, contiguous memory format.
    """
    device = resolve_device(cfg.get("device", "auto") if device is None else device)
    tcfg = cfg.train
    if step_offset is None:
        step_offset = int(torch.randint(0, 2**62, (1,)))
    model.to(device).train()
    if device.type == "cuda" and tcfg.get("channels_last", False):
        model.to(memory_format=torch.channels_last)
    if optimizer is None:
        optimizer = make_optimizer(model, tcfg)
    if ema is None and float(tcfg.get("ema_decay", 0.0)) > 0:
        ema = EMA(model, float(tcfg.ema_decay))
    if ema is not None:
        ema.to(device)
    amp_dtype = _amp(device, bool(tcfg.get("amp", False)))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    clip = float(tcfg.get("grad_clip", 0.0) or 0.0)
    per_sample_clipping = hasattr(optimizer, "noise_multiplier")  # Opacus DPOptimizer
    grad_sample_step = getattr(model, "grad_sample_step", None) if per_sample_clipping else None
    scheduler = make_scheduler(cfg.model)
    noise_gen = torch.Generator(device=device).manual_seed(_seed(cfg.seed, step_offset, 1))
    if loader is not None:
        batches = _loader_batches(loader, steps)
    else:
        batches = _batches(slices, int(tcfg.batch_size), steps, _seed(cfg.seed, step_offset, 0),
                           int(tcfg.get("num_workers", 0)), pin=device.type == "cuda")

    bar = progress_bar_with_loss() if progress is True else (progress or None)
    task = bar.add_task("train", total=steps, loss=float("nan")) if bar is not None else None
    losses: list[float] = []
    sums: dict[str, float] = {}
    done = 0
    start = time.perf_counter()
    with bar if progress is True else nullcontext():  # type: ignore[union-attr]
        for batch in batches:
            done += 1
            if per_sample_clipping and _empty(batch):
                _noise_only_step(optimizer)
                if ema is not None:
                    ema.update(model)
                if bar is not None:
                    bar.update(task, advance=1)
                continue
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if device.type == "cuda" and tcfg.get("channels_last", False):
                batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
                         for k, v in batch.items()}
            if "sd" not in batch:
                raise ValueError("training needs standard-dose PET slices (the set has no SD)")
            batch.setdefault("t1", None)
            optimizer.zero_grad(set_to_none=True)
            if grad_sample_step is not None:  # per-sample gradients straight into p.grad_sample
                with torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext():
                    logs = grad_sample_step(batch, cfg.model, scheduler, noise_gen)
                optimizer.step()
            else:
                with torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext():
                    loss, logs = training_loss(model, batch, cfg.model, scheduler, noise_gen)
                scaler.scale(loss).backward()
                if clip > 0 and not per_sample_clipping:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(optimizer)
                scaler.update()
            if ema is not None:
                ema.update(model)
            losses.append(logs["loss"])
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
            if bar is not None:
                bar.update(task, advance=1, loss=logs["loss"])
    if bar is not None and progress is not True:
        bar.remove_task(task)
    if device.type == "cuda":
        model.to(memory_format=torch.contiguous_format)
    n = max(len(losses), 1)
    return TrainResult(loss=float(np.mean(losses)) if losses else float("nan"),
                       num_examples=len(slices), steps=done,
                       seconds=time.perf_counter() - start, losses=losses,
                       logs={k: v / n for k, v in sums.items()}, optimizer=optimizer, ema=ema)
