"""The ClientApp side of secure aggregation (``fl.secagg.enabled=true``, server/secagg.py).

``secagg_mod`` hands SecAgg+ messages to Flower's ``secaggplus_mod``, which runs the
protocol's key agreement and masking in this process. In its masked-vector stage the
protocol calls the rest of the ClientApp (the central-DP clipping mod, then ``train``) and
expects a legacy ``FitRes``; ``_as_fitres`` turns our train reply into one whose
parameters are the site's *update* (trained - received, array by array in the received
order) and whose metrics are the reply's numbers plus the site's name. Flower's mod then
masks the weighted update and clears the arrays: what leaves the site is the masked vector,
the weight and those metrics.

The coordinator cannot check a masked update, so the site checks its own first: a
non-finite update or one whose arrays differ from what it received is not sent (the
message fails with the reason, the round goes on without the site). A site whose privacy
budget is spent (``dp_refused``) sends a zero update with weight 0.
"""

from __future__ import annotations

from functools import partial
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore import log

from m2diff.wire import ARRAYS_KEY, REFUSED_KEY, SITE_RECORD, WEIGHT_KEY

SITE_METRIC = "site"  # must match server/secagg.py


class SecAggUpdateError(RuntimeError):
    """The site's own update is unfit to send (the coordinator could not tell)."""


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ for train messages of the protocol; anything else passes untouched."""
    if (msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, partial(_as_fitres, call_next=call_next))


def _as_fitres(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the train handler on ``msg``; return its result as a legacy FitRes of the update."""
    received: ArrayRecord = msg.content[ARRAYS_KEY]  # type: ignore[assignment]
    # The rest of the ClientApp sees the plain train message (Flower's clipping mod insists
    # on exactly one ConfigRecord): the protocol's own record stays with secaggplus_mod.
    plain = RecordDict({k: v for k, v in msg.content.items() if k != RECORD_KEY_CONFIGS})
    reply = call_next(Message(content=plain, metadata=msg.metadata), context)
    if reply.has_error():
        raise SecAggUpdateError(f"training failed: {reply.error.reason}")
    trained = next(iter(reply.content.array_records.values()))
    metrics: MetricRecord = next(iter(reply.content.metric_records.values()))
    site = str(reply.content.config_records[SITE_RECORD]["name"])
    deltas = update_of(received, trained, site)
    weight = int(metrics.get(WEIGHT_KEY, 0))
    if int(metrics.get(REFUSED_KEY, 0)) == 1:
        weight = 0  # budget spent: this site's (zero) update must not dilute the mean
    _warn_if_clipped(context, deltas, weight, site)
    fit_metrics: dict = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    fit_metrics[SITE_METRIC] = site
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(deltas), weight, fit_metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def update_of(received: ArrayRecord, trained: ArrayRecord, site: str) -> list[np.ndarray]:
    """``trained - received`` per array in the received order; raises SecAggUpdateError."""
    if list(trained.keys()) != list(received.keys()):
        raise SecAggUpdateError(f"site {site}: trained arrays differ from the received ones")
    deltas = []
    for key in received:
        old, new = received[key].numpy(), trained[key].numpy()
        if new.shape != old.shape:
            raise SecAggUpdateError(f"site {site}: {key} has shape {new.shape}, received {old.shape}")
        delta = new.astype(np.float64) - old.astype(np.float64)
        if not np.all(np.isfinite(delta)):
            raise SecAggUpdateError(f"site {site}: update of {key} is not finite; not sent")
        deltas.append(delta.astype(np.float32))
    return deltas


def _warn_if_clipped(context: Context, deltas: list[np.ndarray], weight: int, site: str) -> None:
    """SecAgg+ clips ``update * weight / max_weight`` to its clipping range without a word:
    say so on the site, where the numbers are known."""
    state = context.state.config_records.get(RECORD_KEY_STATE, {})
    clip, max_weight = float(state.get("clipping_range", 0)), float(state.get("max_weight", 0))
    if clip <= 0 or max_weight <= 0:
        return
    biggest = max((float(np.abs(d).max()) for d in deltas if d.size), default=0.0)
    if biggest * weight / max_weight > clip:
        log(WARNING, "site %s: update x weight/max_weight reaches %.3g > fl.secagg.clipping_range"
            " %.3g: SecAgg+ clips it (raise clipping_range or max_weight)", site,
            biggest * weight / max_weight, clip)
