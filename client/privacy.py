"""The ClientApp side of sample-level DP (``privacy=dp``): DP-SGD local training with a
privacy budget that persists between rounds on the site's own disk.

Every round starts a fresh ClientApp process in deployment, so the RDP accountant's history
is kept in ``<site cache folder>/privacy-<federation>-<site>.json`` (written atomically) and
restored before the next round: the epsilon a site reports after round r covers every round
of that federation so far. ``<federation>`` is sha256 of the run config's ``out-dir`` (or,
when that is empty, of the config's ``out``), first 12 hex digits: a resumed federation gets
a new Flower run id but keeps its out-dir, so it continues the count instead of starting a
new one. A site whose next round would take it above ``privacy.budget_epsilon`` does not
train: it replies with the weights it received and ``dp_refused = 1``, which the server
leaves out of the average (server/strategy.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from torch import nn

from client.site import SiteRun
from m2diff.data.cache import cache_folder
from m2diff.model import unwrap_model
from m2diff.privacy import (
    accountant_state,
    epsilon,
    history_of,
    make_private,
    noise_multiplier,
    sample_rate,
    would_exceed,
)
from m2diff.report import write_json
from m2diff.train import TrainResult, make_optimizer, train_steps, training_dataset


class PrivacyStateError(RuntimeError):
    """The site's saved privacy budget cannot be read: it refuses to train rather than forget it."""


def federation_key(context: Context, run: SiteRun) -> str:
    """12 hex digits naming the federation, the same across resumes (new run ids): sha256 of
    the run config's ``out-dir`` (the coordinator's output folder), else of ``cfg.out``."""
    out = str(context.run_config.get("out-dir", "") or "") or str(run.cfg.get("out", ""))
    return hashlib.sha256(os.path.normpath(out).encode()).hexdigest()[:12]


def state_path(context: Context, run: SiteRun) -> Path:
    """Where this site keeps the accountant history of this federation."""
    site = re.sub(r"[^A-Za-z0-9_.-]+", "_", run.name)
    return cache_folder(run.site.root, run.cfg.data.get("cache_dir")) / \
        f"privacy-{federation_key(context, run)}-{site}.json"


def load_state(path: Path) -> dict[str, Any] | None:
    """The saved accountant state, None when there is none yet."""
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        history_of(state)  # validates the entries
    except (OSError, ValueError, TypeError) as exc:
        raise PrivacyStateError(f"{path}: unreadable privacy state ({exc}); not training") from exc
    return state


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (m2diff.report.write_json: tmp + fsync + os.replace)."""
    write_json(path, state)


def dp_train(context: Context, run: SiteRun, model: nn.Module, slices: Any,
             optimizer: torch.optim.Optimizer | None, seed: int,
             ) -> tuple[nn.Module, TrainResult | None, dict[str, float]]:
    """One round of DP-SGD local training, or a refusal when the budget would be exceeded.

    Returns the bare model (trained, or as received when refused), the TrainResult (None when
    refused) and the metrics every DP reply carries: ``dp_epsilon`` (cumulative, this
    federation, resumes included) and ``dp_refused`` (0 / 1). ``privacy.noise_multiplicity``
    > 1 trains with per-sample gradients from torch.func (m2diff.privacy.make_private).
    """
    cfg, p = run.cfg, run.cfg.privacy
    delta, budget = float(p.delta), p.get("budget_epsilon")
    path = state_path(context, run)
    history = history_of(load_state(path))
    steps = int(cfg.train.steps)
    n = len(training_dataset(slices))
    noise, rate = noise_multiplier(cfg, n), sample_rate(n, int(cfg.train.batch_size))
    if would_exceed(history, noise, rate, steps, delta, None if budget is None else float(budget)):
        return model, None, {"dp_epsilon": epsilon(history, delta), "dp_refused": 1}
    if optimizer is None:
        optimizer = make_optimizer(model, cfg.train)
    private, dp_optimizer, loader, engine = make_private(
        model, optimizer, slices, cfg, {"history": history},
        generator=torch.Generator().manual_seed(seed))
    result = train_steps(private, slices, cfg, steps=steps, optimizer=dp_optimizer,
                         device=run.device, progress=False, loader=loader)
    save_state(path, accountant_state(engine))
    return unwrap_model(private), result, {"dp_epsilon": epsilon(engine, delta), "dp_refused": 0}
