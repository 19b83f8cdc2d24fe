"""The ClientApp: train and evaluate the global model on one site's data.

What leaves the site: the model's weights (the same names and shapes it received), numbers
(num-examples, losses, seconds, per-cohort metrics of the held-out subjects) and the site's
name. No subject ids, file names or images; tests/client/test_privacy.py inspects every
reply for that. With ``privacy=dp`` training is DP-SGD (client/privacy.py) and every train
reply also carries ``dp_epsilon`` and ``dp_refused``. With ``privacy=central_dp
privacy.side=client`` the server's train config carries a clipping norm and
``central_dp_mod`` clips the site's update with Flower's clipping mod before it leaves.
With ``fl.secagg.enabled=true`` the train phase runs Flower's SecAgg+ (client/secagg.py):
the weights leave the site only as a masked update the coordinator cannot read alone.
"""

from __future__ import annotations

import time

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from client.privacy import dp_train
from client.secagg import secagg_mod
from client.site import SiteError, SiteRun
from m2diff.data.dataset import load_slices
from m2diff.data.splits import split_subjects
from m2diff.evaluate import evaluate_subjects, site_metrics
from m2diff.fedutil import add_proximal_term
from m2diff.model import unwrap_model
from m2diff.train import make_optimizer, train_steps


def central_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping mod, only for train messages whose config asks for it
    (``clipping_norm``, sent by the client-side central DP wrappers of server/privacy.py;
    ``central-dp-clipping`` picks fixed or adaptive). Anything else passes untouched."""
    config = msg.content.config_records.get("config")
    if (msg.metadata.message_type != MessageType.TRAIN or config is None
            or "clipping_norm" not in config):
        return call_next(msg, context)
    adaptive = config.get("central-dp-clipping") == "adaptive"
    mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
    trained: list[Message] = []

    def inner(m: Message, c: Context) -> Message:
        trained.append(call_next(m, c))
        return trained[-1]

    try:
        return mod(msg, context, inner)
    except ZeroDivisionError:
        # Flower's clipping divides by the update's norm: an exactly zero update (no step
        # made) needs no clipping and is sent as it is (adaptive: "not clipped").
        reply = trained[-1]
        if adaptive:
            next(iter(reply.content.metric_records.values()))[KEY_NORM_BIT] = 0
        return reply


# SecAgg+ outermost: the clipping mod (and train) run inside its masked-vector stage, so
# a site's update is clipped before it is masked.
app = ClientApp(mods=[secagg_mod, central_dp_mod])


def _reply(msg: Message, run: SiteRun, metrics: dict[str, float],
           model: torch.nn.Module | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": run.name})})
    if model is not None:
        # The bare model's names (no Opacus "_module." prefix): what the server sent.
        content["arrays"] = ArrayRecord(unwrap_model(model).state_dict())
    return Message(content=content, reply_to=msg)


REQUIRE_PRIVACY_KEY = "require-privacy"  # node config: the privacy a hospital insists on


def check_required_privacy(context: Context, run: SiteRun) -> None:
    """A site whose node config says ``require-privacy="dp"`` (or ``central_dp``) trains only
    in runs with that privacy; otherwise it refuses (the round goes on without it). Every
    site composes the run's privacy settings, so sites never mix DP and non-DP training."""
    required = str(context.node_config.get(REQUIRE_PRIVACY_KEY, "") or "none")
    kind = str(run.cfg.privacy.get("kind", "none"))
    if required not in ("none", kind):
        raise SiteError(f"site {run.name} requires privacy={required} (node config "
                        f"{REQUIRE_PRIVACY_KEY}); this run uses privacy={kind}: not training")


def _optimizer(model: torch.nn.Module, run: SiteRun, mu: float) -> torch.optim.Optimizer | None:
    """None (train_steps builds its own) unless FedProx asks for a proximal term."""
    if mu <= 0:
        return None
    opt = make_optimizer(model, run.cfg.train)
    add_proximal_term(opt, model, mu)
    return opt


@app.train()
def train(msg: Message, context: Context) -> Message:
    """``cfg.train.steps`` optimiser steps on the site's train subjects from the global model."""
    start = time.perf_counter()
    run = SiteRun.open(context)
    check_required_privacy(context, run)
    model = run.model_from(msg)
    slices = load_slices(run.site, "train", run.cfg.data, int(run.cfg.seed), int(model.stride))
    config = msg.content.config_records.get("config", ConfigRecord())
    server_round = int(config.get("server-round", 1))
    # A different batch order / noise draw every round, reproducible per site and round.
    torch.manual_seed(int(run.cfg.seed) * 1000 + server_round)
    # The raw weights are what FedAvg averages; a per-round EMA restarted from the global
    # model would only lag behind it, so the site keeps none.
    run.cfg.train.ema_decay = 0.0
    ready = time.perf_counter()
    optimizer = _optimizer(model, run, float(config.get("proximal-mu", 0.0)))
    dp_metrics: dict[str, float] = {}
    if str(run.cfg.privacy.get("kind", "none")) == "dp":
        # DP-SGD; a site whose privacy budget is spent replies with the weights it received.
        model, result, dp_metrics = dp_train(context, run, model, slices, optimizer,
                                             seed=int(run.cfg.seed) * 1000 + server_round)
    else:
        result = train_steps(model, slices, run.cfg, steps=int(run.cfg.train.steps),
                             optimizer=optimizer, device=run.device, progress=False)
    if str(context.node_config.get("test-fault", "")) == "nan":
        # Fault injection for tests only: a broken site the server must reject.
        with torch.no_grad():
            next(iter(model.parameters())).fill_(float("nan"))
    metrics = {
        # A refused (untrained) reply keeps a positive weight; the server drops it anyway.
        "num-examples": int(result.num_examples) if result is not None else len(slices),
        "train_loss": float(result.loss) if result is not None else 0.0,
        "train_steps": int(result.steps) if result is not None else 0,
        "train_seconds": float(result.seconds) if result is not None else 0.0,
        "setup_seconds": float(ready - start),
        **dp_metrics,
    }
    return _reply(msg, run, metrics, model.cpu())


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the LD input and the global model on the site's test subjects, per cohort."""
    start = time.perf_counter()
    run = SiteRun.open(context)
    model = run.model_from(msg).eval()
    test = split_subjects(run.site.subjects, run.cfg.data.split, int(run.cfg.seed))["test"]
    with torch.no_grad():
        rows = evaluate_subjects(model, run.cfg, run.site, test, run.device)
    metrics = site_metrics(rows, method=str(run.cfg.model.arch))
    metrics["num-examples"] = len(test)
    metrics["eval_seconds"] = float(time.perf_counter() - start)
    return _reply(msg, run, metrics)
