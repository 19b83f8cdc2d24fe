"""Flower strategies that know sites by name and refuse unusable updates.

``SiteAwareMixin`` sits in front of any message-based Flower strategy (FedAvg, FedProx,
FedAdam, FedMedian, FedTrimmedAvg): before the base class aggregates, it maps each reply's
``src_node_id`` to the site name the reply carries (with SuperNode auth: the name registered
for that node's key, which the reply must not contradict), drops replies that could poison
the average or end the ServerApp, leaves out train replies with ``dp_refused == 1`` (a DP
site whose privacy budget is spent), and keeps per-site train and evaluate metrics for the
round report. A reply is dropped (one log line naming the site, and the site's rows of the
round say why) when

* its arrays differ from the global model's in names, shapes or dtypes, or hold NaN/inf;
* its weight ``num-examples`` is not an integer in ``1..fl.update_check.max_num_examples``
  (a float 1e15 would replace the global model, -199 flip and amplify an update, weights
  summing to 0 divide by zero);
* its update ``trained - global`` has an L2 norm above ``norm_vs_model`` x the global
  model's norm, or above ``norm_vs_median`` x the median update norm of the round (with at
  least 3 updates): a finite 3e38 update is as bad as a NaN;
* its metrics are not finite numbers or its metric keys differ from the other sites';
* it claims a site name with characters outside ``[A-Za-z0-9._-]`` or another site's name.

Aggregation itself never raises: whatever the base strategy cannot aggregate leaves the
global model as it was and is logged. Robust strategies (fedmedian, fedtrimmedavg) refuse
settings under which they would be a plain mean (``check_strategy``), and a round in
which too few usable updates arrived for them to trim anything keeps the global model.
Error replies (a site that dropped out) are logged and skipped.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg
from flwr.supercore import log
from omegaconf import DictConfig

from m2diff.fedutil import (
    metric_problems,
    model_norm,
    update_norm,
    update_problems,
    weight_problem,
)
from m2diff.wire import DP_EPSILON_KEY, REFUSED_KEY, SITE_RECORD, WEIGHT_KEY
from server.site_names import site_name_problem
from server.strategy_settings import MEDIAN_MIN_SITES, UpdateLimits, check_strategy, trim_needs


def reply_site(msg: Message) -> str | None:
    """The site name a reply carries, or None."""
    record = msg.content.config_records.get(SITE_RECORD)
    name = record.get("name") if record is not None else None
    return str(name) if name is not None else None


class SiteAwareMixin:
    """Site names, update checks and per-site metrics for a Flower strategy (see module doc)."""

    expected_arrays: dict[str, tuple[int, ...]]
    site_names: dict[int, str]
    train_metrics: dict[int, dict[str, dict[str, float]]]
    evaluate_metrics: dict[int, dict[str, dict[str, float]]]
    rejected: dict[int, dict[str, str]]
    rejected_evaluate: dict[int, dict[str, str]]
    dropped: dict[int, list[str]]
    refused: dict[int, list[str]]
    not_aggregated: dict[int, str]
    registered: dict[int, str]

    def init_site_aware(self, expected_arrays: Mapping[str, tuple[int, ...]],
                        dtypes: Mapping[str, str] | None = None,
                        limits: UpdateLimits | None = None) -> None:
        """Set the global model's array names, shapes (and dtypes) every update must match
        and the limits of ``fl.update_check``."""
        self.expected_arrays = dict(expected_arrays)
        self.expected_dtypes = dict(dtypes) if dtypes is not None else None
        self.limits = limits or UpdateLimits()
        self.site_names = {}
        # node id -> the site name of its registered public key (SuperNode auth); a reply
        # from such a node may not claim another name, nor another node a registered one.
        self.registered = {}
        self.train_metrics, self.evaluate_metrics = {}, {}
        self.rejected, self.dropped, self.refused = {}, {}, {}  # train replies
        self.rejected_evaluate: dict[int, dict[str, str]] = {}
        self.not_aggregated = {}  # round -> why its train phase left the global model as it was
        # privacy=dp: a train reply without an epsilon was trained without DP-SGD.
        self.require_dp = False
        self._sent: dict[tuple[int, bool], set[int]] = {}
        self._global: dict[int, ArrayRecord] = {}  # round -> the arrays its updates start from

    def min_train_replies(self) -> int:
        """Usable train replies a round needs before this strategy aggregates (robust
        strategies need enough to drop the extremes)."""
        return 1

    # -- sending: remember who was asked, to name sites that never answer --------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._sent[(server_round, True)] = {m.metadata.dst_node_id for m in messages}
        self._global = {server_round: arrays}  # only the round in flight is kept
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        self._sent[(server_round, False)] = {m.metadata.dst_node_id for m in messages}
        return messages

    # -- receiving ---------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = self._screen(server_round, list(replies), is_train=True)
        if not self.enough_to_aggregate(server_round, usable):
            return None, None
        try:
            return super().aggregate_train(server_round, usable)  # type: ignore[misc]
        except Exception as exc:  # never end the federation over one round's aggregate
            return self.aggregation_failed(server_round, exc), None

    def enough_to_aggregate(self, server_round: int, usable: list[Message]) -> bool:
        """False (logged, and noted in ``not_aggregated``) when the round's usable updates
        are none, or too few for a robust strategy to drop anything."""
        good = sum(1 for m in usable if not m.has_error())
        need = self.min_train_replies()
        if good == 0:
            why = "no usable site update"
        elif good < need:
            why = (f"{good} usable update(s), fewer than the {need} {type(self).__name__} needs "
                   "to drop the extremes (it would be a plain mean)")
        else:
            return True
        log(WARNING, "round %d: %s; the global model stays as it is", server_round, why)
        self.not_aggregated[server_round] = why
        return False

    def aggregation_failed(self, server_round: int, exc: BaseException) -> None:
        why = f"aggregation failed ({type(exc).__name__}: {str(exc)[:200]})"
        log(ERROR, "round %d: %s; the global model stays as it is", server_round, why)
        self.not_aggregated[server_round] = why
        return None

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        usable = self._screen(server_round, list(replies), is_train=False)
        good = [m for m in usable if not m.has_error()]
        if not good or sum(_metrics(m).get(WEIGHT_KEY, 0) for m in good) <= 0:
            return None
        try:
            return super().aggregate_evaluate(server_round, usable)  # type: ignore[misc]
        except Exception as exc:  # the per-site metrics are kept; only the mean is lost
            log(ERROR, "round %d evaluate: aggregating the metrics failed (%s: %s)",
                server_round, type(exc).__name__, str(exc)[:200])
            return None

    def _screen(self, server_round: int, replies: list[Message], is_train: bool) -> list[Message]:
        """Replies fit for the base class: valid ones plus error replies (which it skips)."""
        kind = "train" if is_train else "evaluate"
        errors = [m for m in replies if m.has_error()]
        candidates = [m for m in replies if not m.has_error()]
        verdicts: dict[int, list[str]] = {}
        decoded: dict[int, dict[str, np.ndarray]] = {}  # Array.numpy() decodes: once per reply
        for msg in candidates:
            claim = self.claim_name(msg.metadata.src_node_id, reply_site(msg))
            try:
                verdicts[id(msg)] = ([claim] if claim else []) + self._problems(msg, is_train, decoded)
            except Exception as exc:  # an unreadable record (e.g. an object array) is a bad reply
                verdicts[id(msg)] = [f"unreadable reply ({type(exc).__name__})"]
        if is_train:
            self._check_norms(server_round, candidates, verdicts, decoded)
        # FedAvg ends the run on differing metric keys: keep the most common key set.
        key_sets = Counter(frozenset(_metrics(m)) for m in candidates if not verdicts[id(m)])
        if key_sets:
            common = key_sets.most_common(1)[0][0]
            for msg in candidates:
                if not verdicts[id(msg)] and frozenset(_metrics(msg)) != common:
                    verdicts[id(msg)].append("metric keys differ from the other sites'")
        good: list[Message] = []
        store = self.train_metrics if is_train else self.evaluate_metrics
        for msg in candidates:
            site = self.site_name(msg.metadata.src_node_id)
            problems = verdicts[id(msg)]
            if problems:
                log(WARNING, "round %d %s: rejected update from site %s: %s",
                    server_round, kind, site, "; ".join(problems[:3]))
                rejected = self.rejected if is_train else self.rejected_evaluate
                rejected.setdefault(server_round, {})[site] = "; ".join(problems[:3])
                continue
            store.setdefault(server_round, {})[site] = dict(_metrics(msg))
            if is_train and _metrics(msg).get(REFUSED_KEY, 0) == 1:
                # privacy=dp: the site's budget is spent; it sent back the weights it got.
                log(WARNING, "round %d train: site %s refused to train (privacy budget spent, "
                    "epsilon %.3g); left out of the average", server_round, site,
                    float(_metrics(msg).get(DP_EPSILON_KEY, float("nan"))))
                self.refused.setdefault(server_round, []).append(site)
                continue
            good.append(msg)
        answered = {m.metadata.src_node_id for m in candidates}
        missing = sorted(self._sent.get((server_round, is_train), set()) - answered)
        for msg in errors:
            log(INFO, "round %d %s: error reply: %s", server_round, kind, msg.error.reason)
        if missing:
            names = [self.site_name(n) for n in missing]
            log(WARNING, "round %d %s: no result from %s; aggregating the %d other site(s)",
                server_round, kind, ", ".join(names), len(good))
            self.dropped.setdefault(server_round, []).extend(n for n in names if n not in
                                                             self.dropped.get(server_round, []))
        return good + errors

    def claim_name(self, node: int, name: str | None) -> str | None:
        """Record the site name a reply from ``node`` claims; the problem with the claim
        (the reply is then dropped), None when it is fine."""
        if name is None:
            return None
        problem = site_name_problem(name)
        if problem:
            return problem
        registered = self.registered.get(node)
        if registered is not None and registered != name:
            return f"claims to be site {name!r}, but node {node} is registered as {registered!r}"
        if registered is None and name in self.registered.values():
            return f"claims the name of registered site {name!r} from unregistered node {node}"
        self.site_names[node] = name
        return None

    def _problems(self, msg: Message, is_train: bool,
                  decoded: dict[int, dict[str, np.ndarray]]) -> list[str]:
        content = msg.content
        problems: list[str] = []
        if len(content.metric_records) != 1:
            return [f"expected one MetricRecord, got {len(content.metric_records)}"]
        metrics = _metrics(msg)
        if WEIGHT_KEY not in metrics:
            problems.append(f"no {WEIGHT_KEY}")
        else:
            weight = weight_problem(metrics[WEIGHT_KEY], self.limits.max_num_examples,
                                    allow_zero=not is_train)
            if weight:
                problems.append(weight)
        problems += metric_problems(metrics)
        if is_train and self.require_dp and DP_EPSILON_KEY not in metrics:
            problems.append("trained without DP-SGD (no dp_epsilon) in a privacy=dp run")
        if is_train:
            if len(content.array_records) != 1:
                return problems + [f"expected one ArrayRecord, got {len(content.array_records)}"]
            record = next(iter(content.array_records.values()))
            decoded[id(msg)] = {k: a.numpy() for k, a in record.items()}
            problems += update_problems(decoded[id(msg)], self.expected_arrays, self.expected_dtypes)
        return problems

    def _check_norms(self, server_round: int, candidates: list[Message],
                     verdicts: dict[int, list[str]], decoded: dict[int, dict[str, np.ndarray]]
                     ) -> None:
        """Add a problem to every train reply whose update norm is out of bounds (see the
        module doc). Needs the round's global arrays (recorded by ``configure_train``);
        refusals (``dp_refused``) are not updates and are left out of the median."""
        base = self._global.get(server_round)
        if base is None:
            return
        reference = {k: a.numpy() for k, a in base.items()}
        norms: dict[int, float] = {}
        for msg in candidates:
            if verdicts[id(msg)] or _metrics(msg).get(REFUSED_KEY, 0) == 1:
                continue
            norms[id(msg)] = update_norm(decoded[id(msg)], reference)
        limits = self.limits
        if limits.norm_vs_model > 0:
            bound = limits.norm_vs_model * model_norm(reference)
            for key, norm in list(norms.items()):
                if bound > 0 and norm > bound:
                    verdicts[key].append(f"update norm {norm:.3g} > {limits.norm_vs_model:g} x the "
                                         f"global model's norm ({bound:.3g}; fl.update_check.norm_vs_model)")
                    del norms[key]
        if limits.norm_vs_median > 0 and len(norms) >= 3:
            median = statistics.median(norms.values())
            for key, norm in norms.items():
                if median > 0 and norm > limits.norm_vs_median * median:
                    verdicts[key].append(f"update norm {norm:.3g} > {limits.norm_vs_median:g} x the "
                                         f"round's median {median:.3g} (fl.update_check.norm_vs_median)")

    # -- server-side optimiser state (FedAdam's moments), kept in the checkpoint ---------
    def server_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """FedOpt's first and second moments (empty for the stateless strategies and before
        the first aggregation): a resumed FedAdam continues with them instead of from zero."""
        state = {}
        for name in ("m_t", "v_t"):
            moments = getattr(self, name, None)
            if moments:
                state[name] = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in moments.items()}
        return state

    def load_server_state(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore what ``server_state`` saved (keys that this strategy does not have are refused)."""
        for name, moments in state.items():
            if not hasattr(self, name):
                raise ValueError(f"checkpoint holds {name} of a server optimiser that "
                                 f"{type(self).__name__} does not have (fl.strategy changed?)")
            setattr(self, name, {k: v.numpy() for k, v in moments.items()})

    def site_name(self, node_id: int) -> str:
        """The name registered for the node's key, else the name it last reported, else
        ``node-<id>``."""
        return self.registered.get(node_id) or self.site_names.get(node_id, f"node-{node_id}")


def _metrics(msg: Message) -> Mapping[str, Any]:
    return next(iter(msg.content.metric_records.values()), MetricRecord())


class SiteFedAvg(SiteAwareMixin, FedAvg):
    """FedAvg with site names and update checks."""


class SiteFedProx(SiteAwareMixin, FedProx):
    """FedProx (the site adds the proximal term, see client/app.py) with site checks."""


class SiteFedAdam(SiteAwareMixin, FedAdam):
    """FedAdam (server-side Adam on the averaged update) with site checks."""


class SiteFedMedian(SiteAwareMixin, FedMedian):
    """Coordinate-wise median with site checks (a median of two is their mean: >= 3)."""

    def min_train_replies(self) -> int:
        return MEDIAN_MIN_SITES


class SiteFedTrimmedAvg(SiteAwareMixin, FedTrimmedAvg):
    """Trimmed mean with site checks: needs enough updates that ``beta`` trims one a side."""

    def min_train_replies(self) -> int:
        return trim_needs(float(self.beta))  # type: ignore[attr-defined]


STRATEGIES: dict[str, type[SiteAwareMixin]] = {
    "fedavg": SiteFedAvg,
    "fedprox": SiteFedProx,
    "fedadam": SiteFedAdam,
    "fedmedian": SiteFedMedian,
    "fedtrimmedavg": SiteFedTrimmedAvg,
}


def build_strategy(fl: DictConfig, expected_arrays: Mapping[str, tuple[int, ...]],
                   dtypes: Mapping[str, str] | None = None) -> SiteAwareMixin:
    """The strategy named by ``fl.strategy`` with the federation's settings (checked by
    ``check_strategy``); ``dtypes``: the global model's array dtypes every update must have.

    ``fl.min_sites`` is both the number of sites a round waits for and the number the
    federation may shrink to: a round blocks while fewer are connected.
    """
    check_strategy(fl)
    name = str(fl.strategy).lower()
    n = int(fl.min_sites)
    kwargs: dict[str, Any] = dict(
        fraction_train=float(fl.fraction_train), fraction_evaluate=float(fl.fraction_evaluate),
        min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n,
        weighted_by_key=WEIGHT_KEY,
    )
    if name == "fedprox":
        kwargs["proximal_mu"] = float(fl.proximal_mu)
    elif name == "fedadam":
        kwargs["eta"] = float(fl.server_lr)
    elif name == "fedtrimmedavg":
        kwargs["beta"] = float(fl.trim_beta)
    strategy = STRATEGIES[name](**kwargs)
    strategy.init_site_aware(expected_arrays, dtypes, UpdateLimits.from_config(fl))
    return strategy
