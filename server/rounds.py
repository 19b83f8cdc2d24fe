"""The federated round loop: train, aggregate, evaluate, then a per-round hook.

Like ``flwr.serverapp.strategy.Strategy.start`` but with round numbers that continue
after a resume (``first_round``) and a hook after every round that checkpoints and
records metrics, so a killed ServerApp loses at most the round in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from server.strategy import SiteAwareMixin
from server.transport import Traffic, send_packed


@dataclass
class RoundTiming:
    """Wall seconds of one round's two phases as the ServerApp saw them, and whether its
    train phase changed the global model (False: no usable update was aggregated)."""

    round: int
    train_s: float
    evaluate_s: float
    updated: bool = False
    traffic: Traffic | None = None  # weights' bytes sent and received in the round


TrainPhase = Callable[[int, ArrayRecord, Grid, ConfigRecord], "ArrayRecord | None"]


def _finite(arrays: ArrayRecord) -> bool:
    return all(np.all(np.isfinite(a.numpy())) for a in arrays.values()
               if np.issubdtype(a.numpy().dtype, np.floating))


def run_rounds(
    strategy: SiteAwareMixin,
    grid: Grid,
    arrays: ArrayRecord,
    first_round: int,
    last_round: int,
    timeout: float,
    on_round: Callable[[int, ArrayRecord, RoundTiming], None],
    train_config: dict | None = None,
    evaluate_config: dict | None = None,
    train_phase: TrainPhase | None = None,
    transport: str = "float32",
) -> ArrayRecord:
    """Run rounds ``first_round..last_round`` (inclusive); return the final global arrays.

    Weights travel packed in ``transport`` precision (server/transport.py).

    ``train_phase`` replaces the train phase's send + ``aggregate_train`` (secure
    aggregation, server/secagg.py): it returns the new global arrays or None to keep them.
    """
    for rnd in range(first_round, last_round + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", rnd, last_round)
        t0 = time.perf_counter()
        config = ConfigRecord(dict(train_config or {}))
        train_metrics = None
        traffic = Traffic()
        if train_phase is not None:
            new_arrays = train_phase(rnd, arrays, grid, config)
        else:
            replies = send_packed(
                grid, strategy.configure_train(rnd, arrays, config, grid),  # type: ignore[attr-defined]
                transport, timeout, traffic,
            )
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)  # type: ignore[attr-defined]
        updated = new_arrays is not None and _finite(new_arrays)
        if updated:
            arrays = new_arrays
        elif new_arrays is not None:
            log(WARNING, "round %d: aggregate is not finite; keeping the previous global model", rnd)
            site_aware = getattr(strategy, "site", strategy)  # under a central-DP wrapper
            site_aware.not_aggregated[rnd] = "the aggregate was not finite"
        if train_metrics is not None:
            log(INFO, "\t└──> train: %s", train_metrics)
        t1 = time.perf_counter()
        replies = send_packed(
            grid, strategy.configure_evaluate(rnd, arrays,  # type: ignore[attr-defined]
                                              ConfigRecord(dict(evaluate_config or {})), grid),
            transport, timeout, traffic,
        )
        eval_metrics = strategy.aggregate_evaluate(rnd, replies)  # type: ignore[attr-defined]
        if eval_metrics is not None:
            log(INFO, "\t└──> evaluate: %s", eval_metrics)
        t2 = time.perf_counter()
        on_round(rnd, arrays, RoundTiming(rnd, t1 - t0, t2 - t1, updated, traffic))
    return arrays
