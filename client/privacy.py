"""The ClientApp side of sample-level DP (``privacy=dp``): DP-SGD local training, accounted
in the site's own ledger (client/dp_ledger.py) under the site's policy (client/site_policy.py).

Before a round trains, the site works out what it would spend: the noise multiplier (the
run's ``privacy.noise_multiplier``, else the one that fits ``privacy.target_epsilon`` over the
planned ``fl.rounds x train.steps``), its Poisson sample rate ``1/ceil(slices/batch_size)``
and ``train.steps``. It refuses with an error reply (``site-policy``) a noise below the site's
``min-noise-multiplier``; it replies with the weights it received and ``dp_refused = 1`` when
the round would take

- this federation's epsilon (at the run's ``privacy.delta``) above the run's budget
  (``privacy.budget_epsilon``, else ``privacy.target_epsilon``), or
- the site's lifetime epsilon (all federations, at the site's ``delta``) above the site's
  ``max-epsilon``;

and says in the site's log what it would have spent and what to change. Otherwise the round
is written to the ledger first, then trained. Every DP train reply carries ``dp_epsilon``
(this federation, cumulative), ``dp_epsilon_next`` (what this round took it to, or would
have: equal to ``dp_epsilon`` unless refused) and ``dp_refused``.
"""

from __future__ import annotations

import hashlib
import os
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.supercore import log
from torch import nn

from client.dp_ledger import LEDGER, Entry, SiteLedger, locked, safe_name
from client.site import SiteRun
from client.site_policy import check_noise
from m2diff.data.cache import cache_folder
from m2diff.data.verdict import state_folder
from m2diff.model import unwrap_model
from m2diff.privacy import (
    accountant_state,
    epsilon,
    history_of,
    make_private,
    noise_multiplier,
    sample_rate,
)
from m2diff.train import TrainResult, make_optimizer, train_steps, training_dataset
from m2diff.wire import DP_EPSILON_KEY, DP_EPSILON_NEXT_KEY, OUT_DIR_KEY, REFUSED_KEY


def federation_key(context: Context, run: SiteRun) -> str:
    """12 hex digits naming the federation, the same across resumes (new run ids): sha256 of
    the run config's ``out-dir`` (the coordinator's output folder), else of ``cfg.out``."""
    out = str(context.run_config.get(OUT_DIR_KEY, "") or "") or str(run.cfg.get("out", ""))
    return hashlib.sha256(os.path.normpath(out).encode()).hexdigest()[:12]


def ledger_paths(context: Context, run: SiteRun) -> tuple[Path, Path | None, list[Path]]:
    """(primary, copy, files of earlier releases to import) of this site's ledger."""
    cache = cache_folder(run.site.root, run.cfg.data.get("cache_dir"))
    site = safe_name(run.name)
    if run.virtual:  # m2diff simulate: one ledger per simulated federation, as before
        return cache / f"privacy-{federation_key(context, run)}-{site}.json", None, []
    primary = state_folder(run.site.root, run.policy.state_dir) / LEDGER
    return primary, cache / LEDGER, sorted(cache.glob(f"privacy-*-{site}.json"))


def state_path(context: Context, run: SiteRun) -> Path:
    """Where this site's ledger is (the primary copy)."""
    return ledger_paths(context, run)[0]


def federation_budget(p: Any) -> float | None:
    """The run's per-federation budget: ``budget_epsilon``, else ``target_epsilon``."""
    for key in ("budget_epsilon", "target_epsilon"):
        if p.get(key) is not None:
            return float(p[key])
    return None


def _advice(noise: float, rate: float, steps: int, batch: int, slices: int) -> str:
    return (f"noise multiplier {noise:.3g}, sample rate {rate:.3g} (batch {batch} of {slices} "
            f"slices), {steps} steps: raise privacy.noise_multiplier, lower train.steps or "
            "train.batch_size, set privacy.target_epsilon so fl.rounds x train.steps fit, or "
            "raise the budget")


def dp_train(context: Context, run: SiteRun, model: nn.Module, slices: Any,
             optimizer: torch.optim.Optimizer | None, seed: int,
             ) -> tuple[nn.Module, TrainResult | None, dict[str, float]]:
    """One round of DP-SGD local training, or a refusal (module doc).

    Returns the bare model (trained, or as received when refused), the TrainResult (None when
    refused) and the DP metrics of the reply. ``privacy.noise_multiplicity`` > 1 trains with
    per-sample gradients from torch.func (m2diff.privacy.make_private).
    """
    cfg, p, policy = run.cfg, run.cfg.privacy, run.policy
    delta, budget = float(p.delta), federation_budget(p)
    steps, batch = int(cfg.train.steps), int(cfg.train.batch_size)
    n = len(training_dataset(slices))
    noise, rate = noise_multiplier(cfg, n), sample_rate(n, batch)
    check_noise(noise, policy)
    fed = federation_key(context, run)
    primary, copy, legacy = ledger_paths(context, run)
    with locked(primary):
        ledger = SiteLedger.open(primary, copy, legacy)
        fed_history = ledger.history() if run.virtual else ledger.history(fed)
        step = (noise, rate, steps)
        spent, after = epsilon(fed_history, delta), epsilon(fed_history + [step], delta)
        life_spent = ledger.epsilon(policy.delta)
        life_after = epsilon(ledger.history() + [step], policy.delta)
        reason = ""
        if budget is not None and after > budget:
            reason = (f"this federation's epsilon would go from {spent:.3g} to {after:.3g}, above "
                      f"its budget {budget:g} (privacy.budget_epsilon / target_epsilon)")
        elif not run.virtual and life_after > policy.max_epsilon:
            reason = (f"the site's lifetime epsilon would go from {life_spent:.3g} to "
                      f"{life_after:.3g} (delta {policy.delta:g}), above its max-epsilon "
                      f"{policy.max_epsilon:g}")
        if reason:
            log(WARNING, "site %s refuses to train this round (privacy=dp): %s; %s", run.name,
                reason, _advice(noise, rate, steps, batch, n))
            return model, None, {DP_EPSILON_KEY: spent, DP_EPSILON_NEXT_KEY: after, REFUSED_KEY: 1}
        ledger.reserve(Entry(fed, noise, rate, steps))
    log(INFO, "site %s: DP-SGD round: %s; federation epsilon %.3g -> %.3g, site lifetime "
        "%.3g -> %.3g", run.name, _advice(noise, rate, steps, batch, n).split(":")[0],
        spent, after, life_spent, life_after)
    if optimizer is None:
        optimizer = make_optimizer(model, cfg.train)
    private, dp_optimizer, loader, engine = make_private(
        model, optimizer, slices, cfg, {"history": fed_history},
        generator=torch.Generator().manual_seed(seed))
    result = train_steps(private, slices, cfg, steps=steps, optimizer=dp_optimizer,
                         device=run.device, progress=False, loader=loader)
    counted = epsilon(engine, delta)
    if abs(counted - after) > 1e-6 * max(after, 1.0):
        # What was reserved must be what Opacus counted; anything else is a bug to see.
        raise RuntimeError(f"Opacus counted epsilon {counted}, the ledger reserved {after} "
                           f"({history_of(accountant_state(engine))} vs {fed_history + [step]})")
    return unwrap_model(private), result, {DP_EPSILON_KEY: counted, DP_EPSILON_NEXT_KEY: after,
                                           REFUSED_KEY: 0}
