"""``m2diff train``: resumable centralised training on site folders (``run_train``), with
the loop of m2diff/train.py.

What it writes to ``cfg.out``: checkpoint.pt (EMA weights for inference plus the raw
weights, optimizer state and step for resuming; every ``train.checkpoint_every`` steps and
at the end), loss.csv (step, loss) and loss.png. Run the same command again to continue.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from m2diff.checkpoint import CheckpointError, clean_state_dict, load_checkpoint, save_checkpoint
from m2diff.config import ConfigError, resolve_path
from m2diff.device import resolve_device
from m2diff.model import build_model, count_parameters
from m2diff.train import EMA, make_optimizer, progress_bar_with_loss, train_steps

CHECKPOINT = "checkpoint.pt"


def _site_paths(cfg: DictConfig) -> list[Path]:
    value = cfg.data.get("path")
    if value is None or value == "" or (not isinstance(value, str) and len(value) == 0):
        raise ConfigError("no data: give one or more site folders, data=SITE_DIR or "
                          "data.path=[DIR1,DIR2]")
    values = [value] if isinstance(value, str | Path) else list(value)
    paths = [resolve_path(v) for v in values]
    for path in paths:
        if path is None or not path.is_dir():
            raise ConfigError(f"data: {path} is not a folder")
    return paths  # type: ignore[return-value]


def load_train_slices(cfg: DictConfig, stride: int) -> tuple[Any, list[str]]:
    """The train split of every site in ``cfg.data.path`` as one SliceSet, and the site names.
    Problems found by validation are printed (one line each) and their subjects skipped."""
    from m2diff.data.dataset import SliceSet, load_slices
    from m2diff.data.validate import validate_site

    sets, names = [], []
    for root in _site_paths(cfg):
        site, problems = validate_site(root, require_sd=True)
        for problem in problems:
            print(f"m2diff train: skipped: {problem}", file=sys.stderr)
        if not site.subjects:
            raise ConfigError(f"{root}: no usable subjects with an SD PET (see m2diff check data={root})")
        slices = load_slices(site, "train", cfg.data, int(cfg.seed), stride)
        if len(slices) == 0:
            print(f"m2diff train: {root}: no training slices, skipped", file=sys.stderr)
            continue
        if slices.sd is None:
            raise ConfigError(f"{root}: some training subjects have no standard-dose PET")
        sets.append(slices)
        names.append(site.name)
    if not sets:
        raise ConfigError("no training slices in " + ", ".join(map(str, _site_paths(cfg))))
    return (sets[0] if len(sets) == 1 else SliceSet.concat(sets)), names


def _read_losses(path: Path, upto: int) -> list[float]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= upto]
    return [float(r["loss"]) for r in rows]


def _write_losses(path: Path, losses: list[float]) -> None:
    from m2diff.report import write_csv  # matplotlib: only where a file is written

    write_csv(path, [{"step": i + 1, "loss": f"{v:.6g}"} for i, v in enumerate(losses)])


def plot_losses(path: Path, losses: list[float], title: str) -> None:
    """Loss per step (log scale) with a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    window = max(1, min(50, len(losses) // 10))
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_train(cfg: DictConfig, args: dict[str, str]) -> int:
    """``m2diff train data=SITE_DIR [model=...] [train.steps=...] [out=...]``; resumes from
    ``<out>/checkpoint.pt`` when it exists (same architecture required)."""
    del args
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model)
    slices, sites = load_train_slices(cfg, int(model.stride))
    device = resolve_device(cfg.device)
    out = resolve_path(cfg.out)
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, csv_path = out / CHECKPOINT, out / "loss.csv"

    model.to(device)
    optimizer = make_optimizer(model, cfg.train)
    decay = float(cfg.train.get("ema_decay", 0.0))
    ema = EMA(model, decay) if decay > 0 else None
    step, losses = 0, []
    if ckpt_path.exists():
        try:
            resume = load_checkpoint(ckpt_path, cfg.model)["extra"].get("resume")
        except CheckpointError as exc:
            raise ConfigError(f"{exc} (to start afresh use another out= or remove it)") from None
        if not resume:
            raise ConfigError(f"{ckpt_path}: holds no training state to resume (not written by "
                              "m2diff train); use another out=")
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if ema is not None and resume.get("ema"):
            ema.load_state_dict(resume["ema"])
        step = int(resume["step"])
        losses = _read_losses(csv_path, step)
        print(f"m2diff train: resuming from {ckpt_path} at step {step}")

    total, every = int(cfg.train.steps), max(1, int(cfg.train.checkpoint_every))
    arch = str(cfg.model.arch)
    print(f"m2diff train: {arch} ({count_parameters(model):,} parameters) on {len(slices)} slices "
          f"{slices.size[0]}x{slices.size[1]} from {', '.join(sites)}; device {device}; "
          f"steps {step} -> {total}")
    with progress_bar_with_loss() as bar:
        while step < total:
            n = min(every - step % every, total - step)
            # step_offset=step: an interrupted and resumed run draws what an uninterrupted one would
            result = train_steps(model, slices, cfg, n, optimizer=optimizer, ema=ema, device=device,
                                 progress=bar, step_offset=step)
            step += n
            losses += result.losses
            save_checkpoint(ckpt_path, model, cfg, ema=ema.shadow if ema is not None else None,
                            step=step, sites=sites, resume={
                                "step": step, "model": clean_state_dict(model.state_dict()),
                                "optimizer": optimizer.state_dict(),
                                "ema": ema.state_dict() if ema is not None else None})
            _write_losses(csv_path, losses)
    if losses:
        plot_losses(out / "loss.png", losses, f"m2diff train: {arch}, {len(slices)} slices")
        tail = losses[-min(len(losses), 50):]
        print(f"m2diff train: step {step}, loss (mean of last {len(tail)}) {np.mean(tail):.4f}; "
              f"wrote {ckpt_path}, {csv_path}, {out / 'loss.png'}")
    return 0
