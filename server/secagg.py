"""Secure aggregation of the train phase with Flower's SecAgg+ (``fl.secagg.enabled=true``).

Flower 1.42 implements SecAgg+ only as a workflow of its legacy API
(``flwr.server.workflow.SecAggPlusWorkflow`` over a ``LegacyContext`` and a legacy
``Strategy``; ``secaggplus_mod`` on the ClientApp), while this app uses the Message API
strategies. This module runs Flower's workflow unchanged for one round's train phase and
adapts at its two edges:

- what each site receives in the masked-vector stage is the Message API content our
  site-aware strategy built (``arrays`` + ``config``: global weights, round, FedProx mu,
  clipping norm), one copy per site because the workflow writes each site's key shares
  into it;
- the one thing the workflow hands to the legacy strategy is the *unmasked weighted mean*
  of the sites' updates (SecAgg+ sums ``w_i * update_i`` and ``w_i`` under masks; no single
  ``update_i`` is ever readable here). Sites send ``update_i = trained - global``
  (client/secagg.py), so the new global model is ``global + mean``.

Per-site train metrics (loss, seconds, num-examples, epsilon) still arrive in plain text:
they are aggregate numbers and the per-site report needs them. What the coordinator cannot
do under SecAgg+ is inspect a site's weights: the shape/NaN checks of server/strategy.py
move to the site (client/secagg.py refuses to send a non-finite update), and a malicious
site can still send a bad (finite) update unnoticed; see the README's privacy section.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv
from omegaconf import DictConfig

from m2diff.fedutil import metric_problems, weight_problem
from m2diff.wire import REFUSED_KEY, WEIGHT_KEY
from server.strategy import SiteAwareMixin
from server.strategy_settings import MEAN_STRATEGIES

SITE_METRIC = "site"  # the site's name, a string entry of the (plain-text) legacy fit metrics


def check_secagg(cfg: DictConfig) -> None:
    """Refuse settings SecAgg+ cannot serve, naming the setting."""
    sa = cfg.fl.secagg
    if str(cfg.fl.strategy).lower() not in MEAN_STRATEGIES:
        raise ValueError(f"fl.secagg.enabled=true needs fl.strategy in {MEAN_STRATEGIES} "
                         f"(SecAgg+ yields only a weighted mean), not {cfg.fl.strategy}")
    if int(cfg.fl.min_sites) < 2:
        raise ValueError("fl.secagg.enabled=true needs fl.min_sites >= 2 (one site's 'sum' is its update)")
    kind = str(cfg.privacy.get("kind", "none"))
    if kind == "central_dp" and (str(cfg.privacy.side) != "client" or str(cfg.privacy.clipping) != "fixed"):
        raise ValueError("fl.secagg.enabled=true with privacy=central_dp needs privacy.side=client and "
                         "privacy.clipping=fixed: the coordinator cannot clip or measure updates it "
                         "cannot read")
    if not float(sa.clipping_range) > 0:
        raise ValueError(f"fl.secagg.clipping_range={sa.clipping_range} must be positive")
    if not float(sa.max_weight) > 0:
        raise ValueError(f"fl.secagg.max_weight={sa.max_weight} must be positive")


class _RoundPlan(Strategy):
    """The legacy strategy the SecAgg+ workflow calls: it samples nothing itself (the
    site-aware strategy already chose the sites) and keeps what the workflow aggregated."""

    def __init__(self, pairs: list[tuple[ClientProxy, FitIns]]) -> None:
        self.pairs = pairs
        self.mean: list[np.ndarray] | None = None
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any
                      ) -> list[tuple[ClientProxy, FitIns]]:
        return self.pairs

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        # Every FitRes carries the same unmasked mean (the workflow wrote it into each).
        self.results, self.failures = results, failures
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            return results[0][1].parameters, {}
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any
                           ) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]
                           ) -> tuple[float | None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow whose masked-vector stage sends our Message API content."""

    def __init__(self, contents: Mapping[int, RecordDict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._contents = contents

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        state.nid_to_fitins = {nid: _copy(self._contents[nid]) for nid in state.nid_to_fitins}
        return super().collect_masked_vectors_stage(grid, context, state)


def _copy(content: RecordDict) -> RecordDict:
    """A shallow copy: the arrays are shared (only read), the records dict is per site."""
    return RecordDict({k: (ConfigRecord(dict(v)) if isinstance(v, ConfigRecord) else v)
                       for k, v in content.items()})


class _StageReport:
    """The grid as the SecAgg+ workflow sees it: Flower's own, plus one WARNING per site that
    answers a protocol stage with an error or not at all. Flower's workflow drops such sites
    silently (DEBUG counts only), and with too few left it halts the round; without these
    lines the coordinator learns only that no site's masked update arrived."""

    def __init__(self, grid: Grid, site: SiteAwareMixin, rnd: int) -> None:
        self._grid, self._site, self._rnd = grid, site, rnd

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        messages = list(messages)
        asked = {int(m.metadata.dst_node_id) for m in messages}
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                node = int(reply.metadata.src_node_id)
                who = f"site {self._site.site_name(node)}" if node in asked else "Flower (no site)"
                log(WARNING, "round %d secure aggregation: %s answered a stage with an error: %s",
                    self._rnd, who, str(reply.error.reason)[:300])
        silent = asked - {int(r.metadata.src_node_id) for r in replies}
        if silent:
            log(WARNING, "round %d secure aggregation: no answer to a stage from %s within %s s",
                self._rnd, ", ".join(sorted(self._site.site_name(n) for n in silent)), timeout)
        return replies


class SecureTrainPhase:
    """One round's train phase under SecAgg+; a drop-in for send + ``aggregate_train``.

    ``strategy`` is the site-aware strategy (or a central-DP wrapper around it, whose
    ``configure_train`` adds the clipping norm the sites' clipping mod reads); with
    ``noise`` (central DP, client-side fixed clipping) the server adds the Gaussian noise
    of Flower's wrapper, ``noise_multiplier * clipping_norm / num_sampled``, to the mean.
    """

    def __init__(self, strategy: Any, site: SiteAwareMixin, context: Context, secagg: DictConfig,
                 timeout: float, noise: Any | None = None) -> None:
        self.strategy, self.site, self.context = strategy, site, context
        self.secagg, self.timeout, self.noise = secagg, timeout, noise

    def __call__(self, rnd: int, arrays: ArrayRecord, grid: Grid, config: ConfigRecord
                 ) -> ArrayRecord | None:
        messages = list(self.strategy.configure_train(rnd, arrays, config, grid))
        if not messages:
            log(WARNING, "round %d: no site selected for training", rnd)
            return None
        contents = {m.metadata.dst_node_id: m.content for m in messages}
        run_id = int(self.context.run_id)
        plan = _RoundPlan([(GridClientProxy(nid, grid, run_id), FitIns(Parameters([], ""), {}))
                           for nid in contents])
        legacy = LegacyContext(self.context, config=ServerConfig(num_rounds=rnd), strategy=plan)
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
        legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        sa = self.secagg
        workflow = _Workflow(
            contents,
            num_shares=_share(sa.num_shares), reconstruction_threshold=_share(sa.reconstruction_threshold),
            max_weight=float(sa.max_weight), clipping_range=float(sa.clipping_range),
            quantization_range=int(sa.quantization_range), modulus_range=int(sa.modulus_range),
            timeout=self.timeout)
        workflow(_StageReport(grid, self.site, rnd), legacy)  # type: ignore[arg-type]
        self._record(rnd, plan, set(contents))
        if plan.mean is None:
            log(WARNING, "round %d: secure aggregation produced no mean (too few sites answered "
                "every stage); the global model stays as it is", rnd)
            return None
        return self._apply(rnd, arrays, plan)

    def _record(self, rnd: int, plan: _RoundPlan, asked: set[int]) -> None:
        """Per-site train metrics from the plain-text fit metrics; name the silent sites."""
        answered = set()
        for proxy, res in plan.results:
            node = int(proxy.node_id)  # type: ignore[attr-defined]
            answered.add(node)
            metrics = dict(res.metrics)
            name = metrics.pop(SITE_METRIC, None)
            claim = self.site.claim_name(node, str(name)) if name is not None else None
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            numbers[WEIGHT_KEY] = float(res.num_examples)
            problems = metric_problems(numbers) + ([claim] if claim else [])
            # The weight is inside the masked sum already (clipped to max_weight by Flower's
            # secaggplus_mod): it can be reported, not removed.
            weight = weight_problem(int(res.num_examples), self.site.limits.max_num_examples,
                                    allow_zero=True)
            problems += [weight] if weight else []
            site = self.site.site_name(node)
            if problems:
                log(WARNING, "round %d train: site %s metrics: %s", rnd, site, "; ".join(problems))
            self.site.train_metrics.setdefault(rnd, {})[site] = numbers
            if numbers.get(REFUSED_KEY, 0) == 1:
                self.site.refused.setdefault(rnd, []).append(site)
        missing = sorted(asked - answered)
        if missing:
            names = [self.site.site_name(n) for n in missing]
            log(WARNING, "round %d train: no masked update from %s", rnd, ", ".join(names))
            self.site.dropped.setdefault(rnd, []).extend(names)
        for failure in plan.failures:
            log(INFO, "round %d train: secure aggregation failure: %s", rnd, failure)

    def _apply(self, rnd: int, arrays: ArrayRecord, plan: _RoundPlan) -> ArrayRecord | None:
        if not any(res.num_examples > 0 for _, res in plan.results):
            log(WARNING, "round %d: every site sent weight 0 (privacy budgets spent); the global "
                "model stays as it is", rnd)
            return None
        keys = list(arrays.keys())
        mean = plan.mean or []
        if len(mean) != len(keys):
            log(WARNING, "round %d: secure mean has %d arrays, the model %d; not applied",
                rnd, len(mean), len(keys))
            return None
        if self.noise is not None:
            mean = [np.array(m, dtype=np.float64) for m in mean]
            stdv = compute_stdv(self.noise.noise_multiplier, self.noise.clipping_norm,
                                self.noise.num_sampled_clients)
            add_gaussian_noise_inplace(mean, stdv)
            weights = [float(r.num_examples) for _, r in plan.results]
            eps = self.noise.account(rnd, weights)
            log(INFO, "round %d: central DP noise std %.4g added to the secure mean; "
                "client-level epsilon %.4g", rnd, stdv, eps)
        new = {}
        for key, delta in zip(keys, mean, strict=True):
            old = arrays[key].numpy()
            if delta.shape != old.shape:
                log(WARNING, "round %d: secure mean of %s has shape %s, expected %s; not applied",
                    rnd, key, delta.shape, old.shape)
                return None
            new[key] = Array(np.asarray(old + delta, dtype=old.dtype))
        log(INFO, "round %d: secure aggregate of %d site(s) applied", rnd, len(plan.results))
        return ArrayRecord(new)


def _share(value: Any) -> int | float:
    """SecAgg+ reads an int as a count and a float as a fraction: keep that distinction."""
    number = float(value)
    return int(number) if number > 1 or (number == 1 and isinstance(value, int)) else number


def secagg_settings(secagg: Mapping[str, Any]) -> str:
    """One log line of the settings."""
    return ", ".join(f"{k}={secagg.get(k)}" for k in
                     ("num_shares", "reconstruction_threshold", "clipping_range", "max_weight"))
