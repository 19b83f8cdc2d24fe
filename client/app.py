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

The run config is untrusted: it is checked and composed under the site's policy
(client/site_policy.py), the site's privacy policy is applied to train and evaluate alike,
and a message the site does not answer gets an error reply with a fixed code only
(client/site_errors.py, the outermost mod).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

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
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from client.secagg import secagg_mod
from client.site import SiteRun
from client.site_errors import SitePolicyError, site_errors_mod
from client.site_policy import SitePolicy, check_privacy, run_privacy
from client.transport import transport_mod
from m2diff.data.dataset import load_slices
from m2diff.fedutil import add_proximal_term
from m2diff.model import unwrap_model
from m2diff.train import make_optimizer, train_steps
from m2diff.wire import PROXIMAL_MU_KEY, SERVER_ROUND_KEY, WEIGHT_KEY

# Flower starts a fresh ClientApp process for every message: what only one kind of message
# needs (Opacus for privacy=dp, the metrics for evaluate) is imported inside its handler.


def site_policy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A site with ``require-secagg`` trains only on SecAgg+ messages: a plain train message
    (the coordinator's ServerApp skipping the protocol whatever the run config says) is
    refused before anything runs."""
    if msg.metadata.message_type == MessageType.TRAIN and \
            RECORD_KEY_CONFIGS not in msg.content.config_records and \
            SitePolicy.from_node_config(context.node_config).require_secagg:
        raise SitePolicyError("this site requires secure aggregation (node config "
                              "require-secagg); the train message is not a SecAgg+ message")
    return call_next(msg, context)


def central_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping mod, only for train messages whose config asks for it
    (``clipping_norm``, sent by the client-side central DP wrappers of server/privacy.py;
    ``central-dp-clipping`` picks fixed or adaptive). Anything else passes untouched, except
    on a site that requires ``central_dp``: there a train message without a clipping norm
    (server-side clipping: the raw update would leave) is refused, and the norm the message
    asks for is capped at the site's ``clip-norm``."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config is not None:
        policy = SitePolicy.from_node_config(context.node_config)
        if policy.require_privacy == "central_dp":
            norm = config.get(KEY_CLIPPING_NORM)
            if not isinstance(norm, int | float) or not norm > 0:
                raise SitePolicyError("this site requires central_dp with its own clipping; the "
                                      "train message asks for none (server-side clipping)")
            config[KEY_CLIPPING_NORM] = min(float(norm), policy.clip_norm)
    if (msg.metadata.message_type != MessageType.TRAIN or config is None
            or KEY_CLIPPING_NORM not in config):
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


# Fixed-code errors outermost, then the SecAgg+ requirement; SecAgg+ next: the clipping mod
# (and train) run inside its masked-vector stage, so a site's update is clipped before it is
# masked. Packed weights (client/transport.py) are unpacked before clipping sees them.
app = ClientApp(mods=[site_errors_mod, site_policy_mod, secagg_mod, transport_mod,
                      central_dp_mod])


def _reply(msg: Message, run: SiteRun, metrics: dict[str, float],
           model: torch.nn.Module | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": run.name})})
    if model is not None:
        # The bare model's names (no Opacus "_module." prefix): what the server sent.
        content["arrays"] = ArrayRecord(unwrap_model(model).state_dict())
    return Message(content=content, reply_to=msg)


def process_seconds() -> float:
    """Seconds since this ``flwr-clientapp`` process started (the interpreter, the imports and
    the message's transfer from the SuperNode), Linux only; 0.0 elsewhere and in simulation,
    where one long-lived worker runs every message."""
    if "clientapp" not in Path(sys.argv[0]).name:
        return 0.0
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: start
    except (OSError, ValueError, IndexError):
        return 0.0


def check_required_privacy(context: Context, run: SiteRun) -> None:
    """A site whose node config says ``require-privacy="dp"`` (or ``central_dp``) trains and
    evaluates only in runs with that privacy (and the rest of its privacy policy,
    client/site_policy.py); otherwise it refuses (SitePolicyError; the round goes on without
    it). Every site composes the run's privacy settings, so sites never mix DP and non-DP."""
    check_privacy(run.cfg, SitePolicy.from_node_config(context.node_config), run.name)


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
    started = process_seconds()
    start = time.perf_counter()
    run = SiteRun.open(context)  # checks the overrides, caps and privacy policy
    run.subjects("train")  # min-split-subjects
    model = run.model_from(msg)
    slices = load_slices(run.site, "train", run.cfg.data, run.split_seed, int(model.stride))
    config = msg.content.config_records.get("config", ConfigRecord())
    server_round = int(config.get(SERVER_ROUND_KEY, 1))
    # A different batch order / noise draw every round, reproducible per site and round.
    torch.manual_seed(int(run.cfg.seed) * 1000 + server_round)
    # The raw weights are what FedAvg averages; a per-round EMA restarted from the global
    # model would only lag behind it, so the site keeps none.
    run.cfg.train.ema_decay = 0.0
    optimizer = _optimizer(model, run, float(config.get(PROXIMAL_MU_KEY, 0.0)))
    dp_metrics: dict[str, float] = {}
    if run_privacy(run.cfg) == "dp":
        from client.privacy import dp_train  # Opacus: only in privacy=dp runs

        # DP-SGD; a site whose privacy budget is spent replies with the weights it received.
        model, result, dp_metrics = dp_train(context, run, model, slices, optimizer,
                                             seed=int(run.cfg.seed) * 1000 + server_round)
    else:
        result = train_steps(model, slices, run.cfg, steps=int(run.cfg.train.steps),
                             optimizer=optimizer, device=run.device, progress=False)
    # From the handler's start to the first training step (the loop's own time taken out).
    trained_s = float(result.seconds) if result is not None else 0.0
    setup_s = time.perf_counter() - start - trained_s
    if str(context.node_config.get("test-fault", "")) == "nan":
        # Fault injection for tests only: a broken site the server must reject.
        with torch.no_grad():
            next(iter(model.parameters())).fill_(float("nan"))
    metrics = {
        # A refused (untrained) reply keeps a positive weight; the server drops it anyway.
        WEIGHT_KEY: int(result.num_examples) if result is not None else len(slices),
        "train_loss": float(result.loss) if result is not None else 0.0,
        "train_steps": int(result.steps) if result is not None else 0,
        "train_seconds": trained_s,
        "setup_seconds": float(setup_s),
        "process_seconds": started,  # before this handler ran (0.0 in simulation)
        **dp_metrics,
    }
    return _reply(msg, run, metrics, model.cpu())


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the LD input and the global model on the site's test subjects, per cohort."""
    from m2diff.evaluate import evaluate_subjects, site_metrics  # (see the imports above)

    start = time.perf_counter()
    run = SiteRun.open(context)  # the same policy as train: no answer in runs it refuses
    test = run.subjects("test")
    model = run.model_from(msg).eval()
    with torch.no_grad():
        rows = evaluate_subjects(model, run.cfg, run.site, test, run.device)
    metrics = site_metrics(rows, method=str(run.cfg.model.arch))
    metrics[WEIGHT_KEY] = len(test)
    metrics["eval_seconds"] = float(time.perf_counter() - start)
    return _reply(msg, run, metrics)
