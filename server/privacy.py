"""Client-level (central) differential privacy: ``privacy=central_dp``.

``wrap_central_dp`` puts one of Flower's DP strategy wrappers (fixed or adaptive clipping,
on the server or on the sites) around the site-aware strategy of ``server/strategy.py``.
The site checks run first: the wrapper only ever clips, averages and noises replies the
``SiteAwareMixin`` accepted (error replies, rejected and ``dp_refused`` replies are left
out before clipping), and the mixin's checks are not run a second time after clipping.

Flower adds the noise but counts no epsilon for this setting, so ``ClientLevelAccountant``
does: Opacus' RDP accountant, one step per round that released a noised aggregate, with

* sample rate ``q = num_sampled_clients / population`` (sites asked per round / all sites),
* noise multiplier ``z`` as configured (for adaptive clipping too: Flower splits ``z``
  between the update and the clipped-count noise so that the pair is as private as one
  Gaussian mechanism with ``z``, Andrew et al. 2021).

Assumptions behind the number (the usual ones for DP-FedAvg; they are not all enforced):
sites are sampled independently at rate ``q`` (Opacus assumes Poisson sampling; Flower
samples a fixed number of sites uniformly, and with ``q = 1`` the two coincide); one site's
whole contribution to a round is its one update (client-level adjacency: adding or removing
a site); the noise std ``z * C / num_sampled`` is calibrated to the sensitivity ``C / n`` of
an equal-weight mean of ``n = num_sampled`` clipped updates. Where a round averages fewer
sites (a site dropped out or was rejected) or FedAvg weights the sites unequally
(``num-examples``), the same noise covers a larger sensitivity ``C * max(w) / sum(w)``
(other sites' weights held fixed): that round is counted with the smaller effective
multiplier ``z * sum(w) / (num_sampled * max(w))``. Training metrics the sites send in
the clear are not covered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore import log
from omegaconf import DictConfig
from opacus.accountants import RDPAccountant

from m2diff.wire import CLIPPING_KIND_KEY, WEIGHT_KEY
from server.strategy import SiteAwareMixin
from server.strategy_settings import MEAN_STRATEGIES

LEDGER_FILE = "central_dp.json"


class LedgerMissing(RuntimeError):
    """A central-DP run would resume without the ledger of the rounds it already released."""


class ClientLevelAccountant:
    """Epsilon of the client-level Gaussian mechanism over the rounds released so far.

    ``history`` holds one ``[round, noise_multiplier, sample_rate]`` per noised aggregate;
    ``epsilon()`` replays it into a fresh Opacus ``RDPAccountant`` (one step per round).
    """

    def __init__(self, delta: float, history: Iterable[Iterable[float]] = ()) -> None:
        self.delta = float(delta)
        self.history: list[list[float]] = [[int(r), float(z), float(q)] for r, z, q in history]
        self.path: Path | None = None  # where save() writes (set by load)

    def step(self, server_round: int, noise_multiplier: float, sample_rate: float) -> float:
        """Count one released round; return the cumulative epsilon."""
        self.history.append([int(server_round), float(noise_multiplier), float(sample_rate)])
        return self.epsilon()

    def epsilon(self) -> float:
        """Cumulative epsilon at ``delta`` (0.0 before the first round)."""
        if not self.history:
            return 0.0
        acc = RDPAccountant()
        for _, z, q in self.history:
            acc.step(noise_multiplier=z, sample_rate=q)
        return float(acc.get_epsilon(delta=self.delta))

    def save(self, path: Path | None = None) -> None:
        """Write the ledger atomically (m2diff.report's writer: temp file, fsync, rename,
        fsync of the folder) to ``path`` or the file it was loaded from."""
        from m2diff.report import write_json

        path = path or self.path
        if path is None:
            return
        write_json(path, {"delta": self.delta, "history": self.history})

    @classmethod
    def load(cls, path: Path, delta: float, keep_until: int) -> ClientLevelAccountant:
        """The ledger of a run, saved back to ``path`` after every released round. Every
        row is kept, also rounds after the checkpoint's ``keep_until``: their noised model
        was released (to the sites, in the evaluate phase) before the crash that lost the
        checkpoint, so a round run again counts twice. A run that resumes after round
        ``keep_until`` > 0 needs the file: without it the epsilon already spent is unknown,
        and LedgerMissing says so."""
        if not path.is_file():
            if keep_until > 0:
                raise LedgerMissing(
                    f"{path} is missing but the checkpoint is at round {keep_until}: the "
                    "client-level epsilon of the released rounds is unknown, so the run is not "
                    "resumed. Restore the file, or start over with fl.resume=false (a new "
                    "out-dir) if those rounds did not use privacy=central_dp")
            ledger = cls(delta)
        else:
            rows = json.loads(path.read_text()).get("history", [])
            ledger = cls(delta, rows)
        ledger.path = path
        return ledger


def effective_noise_multiplier(noise_multiplier: float, num_sampled: int,
                               weights: Iterable[float]) -> float:
    """``z * sum(w) / (num_sampled * max(w))``: ``z`` for ``num_sampled`` equal weights, less
    for fewer or unequal ones (see module doc)."""
    w = [float(x) for x in weights]
    if not w or max(w) <= 0:
        return float(noise_multiplier)
    return float(noise_multiplier) * min(1.0, sum(w) / (num_sampled * max(w)))


class _Unscreened:
    """The site-aware strategy as the DP wrapper sees it: sending and evaluation go through
    the mixin; ``aggregate_train`` gets replies the wrapper already screened and goes
    straight to the base Flower strategy (FedAvg / FedProx)."""

    def __init__(self, site: SiteAwareMixin) -> None:
        self.site = site

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super(SiteAwareMixin, self.site).aggregate_train(server_round, replies)  # type: ignore[misc]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.site, name)


class _CentralDP:
    """Screening before the Flower wrapper's clipping and noise, and epsilon after it."""

    site: SiteAwareMixin
    ledger: ClientLevelAccountant
    sample_rate: float
    accounted_noise: float
    clipping_kind: str
    num_sampled_clients: int

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[CLIPPING_KIND_KEY] = self.clipping_kind
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = [m for m in self.site._screen(server_round, list(replies), is_train=True)
                  if not m.has_error()]
        if isinstance(self, ServerFixedDP | ServerAdaptiveDP):
            usable = self._drop_unchanged(server_round, usable)
        if not self.site.enough_to_aggregate(server_round, usable):
            return None, None
        weights = [float(next(iter(m.content.metric_records.values())).get(WEIGHT_KEY, 0))
                   for m in usable]
        try:
            arrays, metrics = super().aggregate_train(server_round, usable)  # type: ignore[misc]
        except Exception as exc:  # never end the federation over one round's aggregate
            return self.site.aggregation_failed(server_round, exc), None
        if arrays is not None:
            # Counted and written to disk before the noised model leaves this function (the
            # evaluate phase sends it to every site): a crash after a release never loses it.
            self.account(server_round, weights)
        return arrays, metrics

    def _drop_unchanged(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Replies whose weights differ from the global model's. Flower's server-side clipping
        divides by the update's norm and crashes the ServerApp on an exactly zero update (a
        site that made no step); such a site is left out of the mean, with a warning."""
        current = [a.numpy() for a in self.current_arrays.values()]  # type: ignore[attr-defined]
        keep = []
        for msg in replies:
            arrays = next(iter(msg.content.array_records.values()))
            if all(np.array_equal(a.numpy(), c) for a, c in zip(arrays.values(), current, strict=True)):
                log(WARNING, "round %d train: site %s sent the global model back unchanged; left "
                    "out of the average (a zero update cannot be clipped)", server_round,
                    self.site.site_name(msg.metadata.src_node_id))
                continue
            keep.append(msg)
        return keep

    def account(self, server_round: int, weights: Iterable[float]) -> float:
        """Count one noised release of a mean over sites with these weights; the epsilon."""
        z = effective_noise_multiplier(self.accounted_noise, self.num_sampled_clients, weights)
        eps = self.ledger.step(server_round, z, self.sample_rate)
        self.ledger.save()
        log(INFO, "round %d: client-level DP epsilon %.4g at delta %g after %d round(s) "
            "(noise multiplier %.3g counted, sample rate %.3g)", server_round, eps,
            self.ledger.delta, len(self.ledger.history), z, self.sample_rate)
        return eps

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.site.aggregate_evaluate(server_round, replies)

    def epsilon(self) -> float:
        return self.ledger.epsilon()


class ServerFixedDP(_CentralDP, DifferentialPrivacyServerSideFixedClipping):
    """Server-side fixed clipping."""


class ClientFixedDP(_CentralDP, DifferentialPrivacyClientSideFixedClipping):
    """Fixed clipping on the sites (``fixedclipping_mod``, see client/app.py)."""


class ServerAdaptiveDP(_CentralDP, DifferentialPrivacyServerSideAdaptiveClipping):
    """Server-side adaptive clipping."""


class ClientAdaptiveDP(_CentralDP, DifferentialPrivacyClientSideAdaptiveClipping):
    """Adaptive clipping on the sites (``adaptiveclipping_mod``, see client/app.py)."""


WRAPPERS = {("fixed", "server"): ServerFixedDP, ("fixed", "client"): ClientFixedDP,
            ("adaptive", "server"): ServerAdaptiveDP, ("adaptive", "client"): ClientAdaptiveDP}


def sampling(privacy: DictConfig, fl: DictConfig) -> tuple[int, int]:
    """``(num_sampled_clients, population)``; defaults: all ``fl.sites``, and as many per round
    as FedAvg's ``configure_train`` samples from them."""
    population = int(privacy.get("population") or fl.sites)
    sampled = privacy.get("num_sampled_clients")
    if sampled is None:
        sampled = max(int(float(fl.fraction_train) * population), int(fl.min_sites))
    sampled = int(sampled)
    if not 0 < sampled <= population:
        raise ValueError(f"privacy.num_sampled_clients={sampled} must be in 1..{population} "
                         "(privacy.population / fl.sites)")
    return sampled, population


def clipped_count_stddev(privacy: DictConfig, sampled: int) -> float:
    """``privacy.clipped_count_stddev``, else ``max(sampled / 20, noise_multiplier)``: Flower's
    default ``sampled / 20`` alone is refused for a federation of a few sites (it must exceed
    half the noise multiplier)."""
    value = privacy.get("clipped_count_stddev")
    if value is not None:
        return float(value)
    return max(sampled / 20, float(privacy.noise_multiplier))


def wrap_central_dp(site: SiteAwareMixin, privacy: DictConfig, fl: DictConfig,
                    ledger: ClientLevelAccountant | None = None) -> _CentralDP:
    """Flower's DP wrapper named by ``privacy.clipping`` x ``privacy.side`` around ``site``."""
    if str(fl.strategy).lower() not in MEAN_STRATEGIES:
        raise ValueError(f"privacy=central_dp needs fl.strategy in {MEAN_STRATEGIES} (the noise "
                         f"is calibrated to a mean of clipped updates), not {fl.strategy}")
    key = (str(privacy.clipping).lower(), str(privacy.side).lower())
    if key not in WRAPPERS:
        raise ValueError(f"privacy.clipping={privacy.clipping}, privacy.side={privacy.side}: "
                         "choose fixed|adaptive and server|client")
    z = float(privacy.noise_multiplier)
    if not z > 0 or not math.isfinite(z):
        raise ValueError("privacy.noise_multiplier must be positive for an epsilon")
    sampled, population = sampling(privacy, fl)
    inner = _Unscreened(site)
    if key[0] == "fixed":
        wrapper = WRAPPERS[key](inner, z, float(privacy.clipping_norm), sampled)  # type: ignore[arg-type]
    else:
        wrapper = WRAPPERS[key](
            inner, z, sampled,  # type: ignore[arg-type]
            initial_clipping_norm=float(privacy.clipping_norm),
            target_clipped_quantile=float(privacy.target_clipped_quantile),
            clip_norm_lr=float(privacy.clip_norm_lr),
            clipped_count_stddev=clipped_count_stddev(privacy, sampled))
    wrapper.site = site
    wrapper.ledger = ledger if ledger is not None else ClientLevelAccountant(float(privacy.delta))
    wrapper.sample_rate = sampled / population
    wrapper.accounted_noise = z
    wrapper.clipping_kind = key[0]
    return wrapper


def noise_to_update(privacy: DictConfig, fl: DictConfig, num_weights: int) -> float:
    """Expected norm of the Gaussian noise Flower adds to the mean update, in units of the
    largest mean update the clipping allows: ``noise_multiplier * sqrt(num_weights) /
    num_sampled_clients``. Above 1 the noise outweighs any update: the tiny model (0.62 M
    weights) at the default noise multiplier 1 needs ~800 sites per round to get below it."""
    sampled, _ = sampling(privacy, fl)
    return float(privacy.noise_multiplier) * math.sqrt(num_weights) / sampled


def refuse_drowned_updates(privacy: DictConfig, fl: DictConfig, num_weights: int) -> str | None:
    """Raise ValueError when ``noise_to_update`` > 1 and ``privacy.allow_noise_dominated`` is
    not set; with it set, return the warning to log (None when the noise is below 1)."""
    sampled, _ = sampling(privacy, fl)
    ratio = noise_to_update(privacy, fl, num_weights)
    if ratio <= 1:
        return None
    text = (f"client-level DP noise is {ratio:.3g} x the largest possible mean update "
            f"(noise_multiplier x sqrt({num_weights} weights) / {sampled} sites per round): "
            "each round replaces the model's progress with noise and the global model will be "
            "worse than its start, whatever the budget. Client-level DP needs hundreds of sites "
            "per round for a model of this size; with a few hospitals use privacy=dp "
            "(sample-level, per site) instead")
    if not bool(privacy.get("allow_noise_dominated", False)):
        raise ValueError(f"privacy=central_dp refused: {text}; "
                         "privacy.allow_noise_dominated=true runs it anyway")
    return text


def central_dp_settings(privacy: Mapping[str, Any]) -> str:
    """One log line of the settings."""
    return ", ".join(f"{k}={privacy.get(k)}" for k in
                     ("clipping", "side", "noise_multiplier", "clipping_norm",
                      "num_sampled_clients", "population", "delta"))
