"""Flower strategies that know sites by name and refuse unusable updates.

``SiteAwareMixin`` sits in front of any message-based Flower strategy (FedAvg, FedProx,
FedAdam, FedMedian, FedTrimmedAvg): before the base class aggregates, it maps each reply's
``src_node_id`` to the site name the reply carries, drops replies with the wrong
arrays (names/shapes), non-finite values or inconsistent metric keys (one log line naming
the site; such a reply would otherwise poison the average or end the ServerApp), leaves out
train replies with ``dp_refused == 1`` (a DP site whose privacy budget is spent), and keeps
per-site train and evaluate metrics for the round report. Error replies (a site that
dropped out) are logged and skipped; the base class aggregates the survivors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg
from flwr.supercore import log
from omegaconf import DictConfig

from m2diff.fedutil import metric_problems, update_problems

SITE_RECORD = "site"  # ConfigRecord key of a reply: {"name": "<site name>"}
WEIGHT_KEY = "num-examples"
DP_EPSILON_KEY = "dp_epsilon"  # privacy=dp: the site's cumulative epsilon, in every train reply
REFUSED_KEY = "dp_refused"  # privacy=dp: 1 when a site's budget is spent and it did not train


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
    dropped: dict[int, list[str]]
    refused: dict[int, list[str]]

    def init_site_aware(self, expected_arrays: Mapping[str, tuple[int, ...]]) -> None:
        """Set the global model's array names and shapes every update must match."""
        self.expected_arrays = dict(expected_arrays)
        self.site_names = {}
        self.train_metrics, self.evaluate_metrics = {}, {}
        self.rejected, self.dropped, self.refused = {}, {}, {}
        # privacy=dp: a train reply without an epsilon was trained without DP-SGD.
        self.require_dp = False
        self._sent: dict[tuple[int, bool], set[int]] = {}

    # -- sending: remember who was asked, to name sites that never answer --------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._sent[(server_round, True)] = {m.metadata.dst_node_id for m in messages}
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
        if not any(not m.has_error() for m in usable):
            log(WARNING, "round %d: no usable site update; the global model stays as it is",
                server_round)
            return None, None
        return super().aggregate_train(server_round, usable)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        usable = self._screen(server_round, list(replies), is_train=False)
        good = [m for m in usable if not m.has_error()]
        if not good or sum(_metrics(m).get(WEIGHT_KEY, 0) for m in good) <= 0:
            return None
        return super().aggregate_evaluate(server_round, usable)  # type: ignore[misc]

    def _screen(self, server_round: int, replies: list[Message], is_train: bool) -> list[Message]:
        """Replies fit for the base class: valid ones plus error replies (which it skips)."""
        kind = "train" if is_train else "evaluate"
        errors = [m for m in replies if m.has_error()]
        candidates = [m for m in replies if not m.has_error()]
        verdicts: dict[int, list[str]] = {}
        for msg in candidates:
            node = msg.metadata.src_node_id
            name = reply_site(msg)
            if name:
                self.site_names[node] = name
            verdicts[id(msg)] = self._problems(msg, is_train)
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
                self.rejected.setdefault(server_round, {})[site] = "; ".join(problems[:3])
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

    def _problems(self, msg: Message, is_train: bool) -> list[str]:
        content = msg.content
        problems: list[str] = []
        if len(content.metric_records) != 1:
            return [f"expected one MetricRecord, got {len(content.metric_records)}"]
        metrics = _metrics(msg)
        if WEIGHT_KEY not in metrics:
            problems.append(f"no {WEIGHT_KEY}")
        problems += metric_problems(metrics)
        if is_train and self.require_dp and DP_EPSILON_KEY not in metrics:
            problems.append("trained without DP-SGD (no dp_epsilon) in a privacy=dp run")
        if is_train:
            if len(content.array_records) != 1:
                return problems + [f"expected one ArrayRecord, got {len(content.array_records)}"]
            record = next(iter(content.array_records.values()))
            problems += update_problems({k: a.numpy() for k, a in record.items()},
                                        self.expected_arrays)
        return problems

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
        """The name a node last reported, else ``node-<id>``."""
        return self.site_names.get(node_id, f"node-{node_id}")


def _metrics(msg: Message) -> Mapping[str, Any]:
    return next(iter(msg.content.metric_records.values()), MetricRecord())


class SiteFedAvg(SiteAwareMixin, FedAvg):
    """FedAvg with site names and update checks."""


class SiteFedProx(SiteAwareMixin, FedProx):
    """FedProx (the site adds the proximal term, see client/app.py) with site checks."""


class SiteFedAdam(SiteAwareMixin, FedAdam):
    """FedAdam (server-side Adam on the averaged update) with site checks."""


class SiteFedMedian(SiteAwareMixin, FedMedian):
    """Coordinate-wise median with site checks."""


class SiteFedTrimmedAvg(SiteAwareMixin, FedTrimmedAvg):
    """Trimmed mean with site checks."""


STRATEGIES: dict[str, type[SiteAwareMixin]] = {
    "fedavg": SiteFedAvg,
    "fedprox": SiteFedProx,
    "fedadam": SiteFedAdam,
    "fedmedian": SiteFedMedian,
    "fedtrimmedavg": SiteFedTrimmedAvg,
}


def build_strategy(fl: DictConfig, expected_arrays: Mapping[str, tuple[int, ...]]) -> SiteAwareMixin:
    """The strategy named by ``fl.strategy`` with the federation's settings.

    ``fl.min_sites`` is both the number of sites a round waits for and the number the
    federation may shrink to: a round blocks while fewer are connected.
    """
    name = str(fl.strategy).lower()
    if name not in STRATEGIES:
        raise ValueError(f"fl.strategy={fl.strategy}: choose one of {', '.join(STRATEGIES)}")
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
    strategy.init_site_aware(expected_arrays)
    return strategy
