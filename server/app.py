"""The ServerApp: compose the config, build the strategy, run the rounds, checkpoint each.

Run config (pyproject ``[tool.flwr.app.config]``): ``out-dir`` (absolute; the ServerApp
runs in the SuperLink's working directory), ``overrides`` (the Hydra overrides every
ClientApp composes too) and ``registered-sites`` (``NODE_ID=NAME ...``: the site name of
each registered SuperNode key, set by m2diff-server with SuperNode auth; a reply may not
contradict it). ``fl.rounds`` is the round the run ends at: with ``fl.resume`` and
``out-dir/checkpoint.pt`` present, it continues at the round after the checkpoint's.

A run in which no round changed the global model (every site refused, was rejected or
dropped out) fails: the ServerApp raises ``NothingTrained`` with the reasons, so
``flwr ls`` reports ``finished:failed`` and m2diff-server / m2diff simulate exit 1.
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from omegaconf import DictConfig

from m2diff.checkpoint import check_compatible
from m2diff.config import resolve_path
from m2diff.fedutil import (
    array_spec,
    compose_run_config,
    dtype_spec,
    format_site_table,
    metric_rows,
)
from m2diff.model import build_model
from m2diff.report import write_json
from m2diff.transport import check_transport
from m2diff.wire import OUT_DIR_KEY, REGISTERED_SITES_KEY
from server.checkpoint import SITES_FILE, RoundRecorder, load_resume, save_global
from server.privacy import (
    LEDGER_FILE,
    ClientLevelAccountant,
    central_dp_settings,
    refuse_drowned_updates,
    wrap_central_dp,
)
from server.rounds import RoundTiming, run_rounds
from server.runtime_patience import READ_TIMEOUT_S, wait_for_slow_answers
from server.secagg import SecureTrainPhase, check_secagg, secagg_settings
from server.site_names import parse_registered
from server.strategy import SiteAwareMixin, build_strategy

app = ServerApp()


class NothingTrained(RuntimeError):
    """No round of the run changed the global model."""


def out_dir(run_config: dict[str, Any], cfg: DictConfig) -> Path:
    """``out-dir`` of the run config, else ``cfg.out`` resolved against the working directory."""
    value = str(run_config.get(OUT_DIR_KEY, "") or "")
    if not value:
        log(WARNING, "run config has no out-dir; writing to %s", resolve_path(cfg.out))
    path = resolve_path(value or cfg.out)
    assert path is not None
    path.mkdir(parents=True, exist_ok=True)
    return path


def round_rows(strategy: SiteAwareMixin, rnd: int, timing: RoundTiming) -> list[dict[str, Any]]:
    """Table rows of one round: per site and cohort, evaluate + train metrics + timings."""
    rows: list[dict[str, Any]] = []
    train = strategy.train_metrics.get(rnd, {})
    rejected = {**{s: f"evaluate: {w}" for s, w in strategy.rejected_evaluate.get(rnd, {}).items()},
                **strategy.rejected.get(rnd, {})}
    for site, metrics in sorted(strategy.evaluate_metrics.get(rnd, {}).items()):
        rows += metric_rows(rnd, site, metrics, train.get(site))
    # A site whose every reply was dropped still gets a row saying why (n = 0: no table line).
    shown = {r["site"] for r in rows}
    rows += [{"round": rnd, "site": site, "cohort": "ALL", "n": 0}
             for site in sorted(set(rejected) - shown)]
    sites = max(1, len({r["site"] for r in rows}))
    traffic = timing.traffic
    for row in rows:
        row.update(round_train_s=round(timing.train_s, 3),
                   round_evaluate_s=round(timing.evaluate_s, 3),
                   global_updated=int(timing.updated))
        if traffic is not None and traffic.sent + traffic.received > 0:
            # weights only (packed payloads, both ways), per site: the round's total / sites
            row["round_mb_per_site"] = round((traffic.sent + traffic.received) / sites / 2**20, 4)
        if row["site"] in rejected:
            row["rejected"] = rejected[row["site"]]
    return rows


def nothing_trained(strategy: SiteAwareMixin, first: int, last: int) -> str:
    """Why no round in ``first..last`` changed the global model, one line."""
    parts = []
    for label, per_round in (("refused to train (privacy budget)", strategy.refused),
                             ("rejected", strategy.rejected), ("no reply", strategy.dropped)):
        sites = sorted({s for r in range(first, last + 1) for s in per_round.get(r, [])})
        if sites:
            parts.append(f"{label}: {', '.join(sites)}")
    reasons = sorted({w for r, w in strategy.not_aggregated.items() if first <= r <= last})
    parts += reasons[:3]
    return (f"no site trained in any of rounds {first}..{last}, the global model is unchanged "
            f"({'; '.join(parts) or 'no reason recorded'}); see the log for each site's reason")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Federated training of the configured model on every connected site."""
    cfg = compose_run_config(context.run_config)
    out = out_dir(dict(context.run_config), cfg)
    if wait_for_slow_answers(grid):  # a deployment: replies lost to a 30 s timeout (module doc)
        log(INFO, "waiting up to %.0f s for each SuperLink answer", READ_TIMEOUT_S)
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model)
    first = 1
    resume = load_resume(out) if cfg.fl.resume else None
    if resume is not None:
        check_compatible(resume.state_dict, model, str(out / "checkpoint.pt"))
        model.load_state_dict(resume.state_dict)
        first = resume.round + 1
        log(INFO, "resuming from %s after round %d", out / "checkpoint.pt", resume.round)
    last = int(cfg.fl.rounds)
    transport = check_transport(cfg.fl.get("transport", "float32"))
    arrays = ArrayRecord(model.state_dict())
    state = {k: a.numpy() for k, a in arrays.items()}
    strategy = build_strategy(cfg.fl, array_spec(state), dtype_spec(state))
    strategy.registered = parse_registered(str(context.run_config.get(REGISTERED_SITES_KEY, "")))
    strategy.require_dp = str(cfg.privacy.get("kind", "none")) == "dp"
    if resume is not None and resume.server_state:
        strategy.load_server_state(resume.server_state)
    runner: Any = strategy
    ledger: ClientLevelAccountant | None = None
    if str(cfg.privacy.get("kind", "none")) == "central_dp":
        # Client-level DP: Flower's wrapper clips and noises what the site checks accept.
        ledger = ClientLevelAccountant.load(out / LEDGER_FILE, float(cfg.privacy.delta), first - 1)
        runner = wrap_central_dp(strategy, cfg.privacy, cfg.fl, ledger)
        log(INFO, "central DP: %s; epsilon so far %.4g", central_dp_settings(cfg.privacy),
            ledger.epsilon())
        weights = sum(int(a.numel()) for a in model.state_dict().values() if a.is_floating_point())
        warning = refuse_drowned_updates(cfg.privacy, cfg.fl, weights)
        if warning:
            log(WARNING, "central DP (privacy.allow_noise_dominated=true): %s", warning)
    train_phase: SecureTrainPhase | None = None
    if bool(cfg.fl.secagg.enabled):
        # SecAgg+: the coordinator only ever sees the sum of the sites' masked updates.
        check_secagg(cfg)
        train_phase = SecureTrainPhase(runner, strategy, context, cfg.fl.secagg,
                                       float(cfg.fl.round_timeout),
                                       noise=runner if ledger is not None else None)
        log(INFO, "secure aggregation (SecAgg+): %s", secagg_settings(cfg.fl.secagg))
    recorder = RoundRecorder(out, keep_until=first - 1)
    log(INFO, "m2diff: %s, %s, rounds %d..%d, %.2f MB per model (float32; travels as %s), "
        "out-dir %s", cfg.model.arch, cfg.fl.strategy, first, last,
        arrays.count_bytes() / 2**20, transport, out)
    if first > last:
        log(INFO, "nothing to do: checkpoint is at round %d, fl.rounds=%d", first - 1, last)
        return

    updated: list[int] = []

    def on_round(rnd: int, new_arrays: ArrayRecord, timing: RoundTiming) -> None:
        if timing.updated:
            updated.append(rnd)
        model.load_state_dict(new_arrays.to_torch_state_dict())
        save_global(out, model, cfg, rnd, sites=sorted(set(strategy.site_names.values())),
                    server_state=strategy.server_state())
        rows = round_rows(strategy, rnd, timing)
        if ledger is not None:
            # (saved by the wrapper when the round was released, before the sites saw it)
            eps = ledger.epsilon()
            log(INFO, "round %d: cumulative client-level epsilon %.4g at delta %g",
                rnd, eps, ledger.delta)
            for row in rows:
                row["central_dp_epsilon"] = round(eps, 6)
        if train_phase is not None:
            for row in rows:
                row["secagg"] = 1  # this round's update was aggregated under SecAgg+ masks
        recorder.add(rows)
        # Which node is which site, for `m2diff-server status` (also without SuperNode auth).
        write_json(out / SITES_FILE, {str(n): name for n, name in sorted(strategy.site_names.items())})
        log(INFO, "round %d: checkpoint written (train %.1f s, evaluate %.1f s)",
            rnd, timing.train_s, timing.evaluate_s)

    # FedProx puts "proximal-mu" into each train message itself.
    run_rounds(runner, grid, arrays, first, last, float(cfg.fl.round_timeout), on_round,
               train_phase=train_phase, transport=transport)
    last_rows = [r for r in recorder.rows if r["round"] == last]
    for line in format_site_table(last_rows).splitlines():
        log(INFO, "%s", line)
    if not updated:
        raise NothingTrained(nothing_trained(strategy, first, last))
