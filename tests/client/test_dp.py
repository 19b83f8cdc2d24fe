"""Sample-level DP (privacy=dp): accounting across rounds, the budget refusal (client reply
and server strategy), clean weight names, and that a DP tiny model still learns."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from omegaconf import OmegaConf
from opacus.accountants import RDPAccountant

from client.app import app
from client.privacy import state_path
from client.site import SiteRun
from m2diff.model import build_model
from m2diff.privacy import (
    accountant_state,
    epsilon,
    history_of,
    make_private,
    sample_rate,
    would_exceed,
)
from m2diff.train import make_optimizer, train_steps
from server.strategy import build_strategy
from tests.model.helpers import cfg_for, fake_slices

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DELTA = 1e-5
_run_ids = itertools.count(9001)


def _dp_cfg(*overrides: str):
    return cfg_for("tiny", "privacy=dp", "train.ema_decay=0", *overrides)


def test_epsilon_grows_per_round_and_matches_a_fresh_accountant():
    cfg = _dp_cfg("train.batch_size=8", "privacy.noise_multiplier=1.0")
    slices = fake_slices(n=32, h=16, w=16)
    rate = sample_rate(len(slices), 8)
    assert rate == 0.25
    state, eps = None, []
    for rnd in range(1, 4):
        torch.manual_seed(rnd)
        model = build_model(cfg.model)
        model, opt, loader, engine = make_private(model, make_optimizer(model, cfg.train), slices,
                                                  cfg, state)
        train_steps(model, slices, cfg, 3, optimizer=opt, device="cpu", progress=False,
                    loader=loader)
        state = accountant_state(engine)
        eps.append(epsilon(engine, DELTA))
        fresh = RDPAccountant()
        for _ in range(3 * rnd):
            fresh.step(noise_multiplier=1.0, sample_rate=rate)
        assert eps[-1] == pytest.approx(fresh.get_epsilon(DELTA), rel=1e-9)
        assert sum(n for _, _, n in history_of(state)) == 3 * rnd
    assert eps[0] < eps[1] < eps[2]


def test_would_exceed_and_target_epsilon():
    history = [(1.0, 0.25, 10)]
    spent = epsilon(history, DELTA)
    after = epsilon(history + [(1.0, 0.25, 10)], DELTA)
    assert spent < after
    assert would_exceed(history, 1.0, 0.25, 10, DELTA, budget=(spent + after) / 2)
    assert not would_exceed(history, 1.0, 0.25, 10, DELTA, budget=after * 1.01)
    assert not would_exceed(history, 1.0, 0.25, 10, DELTA, budget=None)
    # target_epsilon: the noise that spends about it over fl.rounds x train.steps steps.
    cfg = _dp_cfg("train.batch_size=8", "privacy.target_epsilon=5.0", "fl.rounds=2",
                  "train.steps=10")
    slices = fake_slices(n=32, h=16, w=16)
    model = build_model(cfg.model)
    _, opt, _, _ = make_private(model, make_optimizer(model, cfg.train), slices, cfg, None)
    assert epsilon([(opt.noise_multiplier, 0.25, 20)], DELTA) == pytest.approx(5.0, abs=0.05)


def test_dp_tiny_model_still_learns():
    cfg = _dp_cfg("train.batch_size=16", "train.lr=1e-3", "privacy.noise_multiplier=0.5")
    slices = fake_slices(n=64, h=16, w=16)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model, opt, loader, _ = make_private(model, make_optimizer(model, cfg.train), slices, cfg,
                                         None, generator=torch.Generator().manual_seed(0))
    losses = train_steps(model, slices, cfg, 60, optimizer=opt, device="cpu", progress=False,
                         loader=loader, step_offset=0).losses
    assert len(losses) == 60 and all(np.isfinite(losses))
    # The default formulation starts at the LD input (zero residual): the first losses are
    # the input's own error (1.29 here); DP-SGD brings it to 1.03 in 60 steps.
    assert np.mean(losses[-15:]) < 0.85 * np.mean(losses[:3])


# --------------------------------------------------------------------------- ClientApp path

def _message(arrays: ArrayRecord, node: int, rnd: int) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})})
    meta = Metadata(run_id=1, message_id=f"m{node}-{rnd}", src_node_id=1, dst_node_id=node,
                    reply_to_message_id="", group_id=str(rnd), created_at=0.0, ttl=600.0,
                    message_type=MessageType.TRAIN)
    return Message(content=content, metadata=meta)


def _train(site_dir, run_id: int, node: int, rnd: int, arrays: ArrayRecord,
           budget: str = "null", out_dir: str = "") -> Message:
    overrides = ("model=tiny train.steps=2 train.batch_size=2 device=cpu privacy=dp "
                 f"privacy.noise_multiplier=1.0 privacy.budget_epsilon={budget}")
    ctx = Context(run_id=run_id, node_id=node, node_config={"data-path": str(site_dir)},
                  state=RecordDict(), run_config={"overrides": overrides, "out-dir": out_dir})
    reply = app(_message(arrays, node, rnd), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


def _metrics(reply: Message) -> dict:
    return dict(next(iter(reply.content.metric_records.values())))


def _arrays(reply: Message) -> ArrayRecord:
    return next(iter(reply.content.array_records.values()))


def test_client_accounts_across_rounds_refuses_at_budget_and_server_drops_it(tiny_sites, tiny_cfg,
                                                                             tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model)
    plain = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    arrays = ArrayRecord(model.state_dict())
    run_id, out = next(_run_ids), str(tmp_path / "fed")
    a, b = tiny_sites[0], tiny_sites[2]

    # Round 1: both sites train; the weights carry the plain model's names.
    r1 = {node: _train(site, run_id, node, 1, arrays, out_dir=out)
          for node, site in ((7, a), (8, b))}
    for reply in r1.values():
        record = _arrays(reply)
        assert {k: tuple(v.shape) for k, v in record.items()} == plain
        assert not any(k.startswith("_module") for k in record)
        m = _metrics(reply)
        assert m["dp_refused"] == 0 and m["dp_epsilon"] > 0 and m["train_steps"] == 2
    eps_b1 = _metrics(r1[8])["dp_epsilon"]

    # Round 2: site a (no budget) trains on; site b's budget would be exceeded: it refuses.
    global2 = _arrays(r1[7])
    ra = _train(a, run_id, 7, 2, global2, out_dir=out)
    rb = _train(b, run_id, 8, 2, global2, budget=str(eps_b1 * 1.01), out_dir=out)
    ma, mb = _metrics(ra), _metrics(rb)
    assert ma["dp_epsilon"] > _metrics(r1[7])["dp_epsilon"]  # cumulative: rounds 1..2
    assert mb["dp_refused"] == 1 and mb["train_steps"] == 0
    assert mb["dp_epsilon"] == pytest.approx(eps_b1)  # nothing more spent
    assert mb["num-examples"] > 0
    assert set(ma) == set(mb)  # identical metric keys from every site
    sent = _arrays(rb)
    assert all(np.array_equal(sent[k].numpy(), global2[k].numpy()) for k in global2)

    # The server leaves the refusal out of the average and names the site.
    fl = OmegaConf.create({"strategy": "fedavg", "min_sites": 1, "fraction_train": 1.0,
                           "fraction_evaluate": 1.0, "proximal_mu": 0.0, "server_lr": 0.01,
                           "trim_beta": 0.2})
    strategy = build_strategy(fl, plain)
    aggregated, _ = strategy.aggregate_train(2, [ra, rb])
    assert aggregated is not None
    mine = _arrays(ra)
    assert all(np.allclose(aggregated[k].numpy(), mine[k].numpy()) for k in mine)
    assert strategy.refused[2] == [strategy.site_name(8)]
    assert 2 not in strategy.rejected
    # Only refusals: no update, the global model stays.
    strategy = build_strategy(fl, plain)
    assert strategy.aggregate_train(2, [rb]) == (None, None)


def test_budget_is_kept_per_federation_out_dir_not_per_run_id(tiny_sites, tiny_cfg, tmp_path):
    """A resumed federation (new Flower run id, same out-dir) continues its sites' epsilon;
    another federation (other out-dir) on the same site starts its own count."""
    site = tiny_sites[1]
    runs = {"same": str(tmp_path / "fed-a"), "other": str(tmp_path / "fed-b")}
    keys = {}
    for label, out in (*runs.items(), ("slash", runs["same"] + "/")):
        ctx = Context(run_id=next(_run_ids), node_id=7, node_config={"data-path": str(site)},
                      state=RecordDict(), run_config={"overrides": "privacy=dp", "out-dir": out})
        path = state_path(ctx, SiteRun.open(ctx))
        assert path.name.startswith("privacy-") and path.name.endswith(f"-{site.name}.json")
        keys[label] = path.name
    assert keys["same"] == keys["slash"] != keys["other"]
    assert runs["same"] not in keys["same"]  # a hash, not the coordinator's path

    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(tiny_cfg.model).state_dict())
    first = _metrics(_train(site, next(_run_ids), 7, 1, arrays, out_dir=runs["same"]))
    resumed = _metrics(_train(site, next(_run_ids), 7, 2, arrays, out_dir=runs["same"]))
    other = _metrics(_train(site, next(_run_ids), 7, 1, arrays, out_dir=runs["other"]))
    assert first["dp_refused"] == resumed["dp_refused"] == other["dp_refused"] == 0
    assert resumed["dp_epsilon"] > first["dp_epsilon"]  # 4 steps counted, not 2
    assert other["dp_epsilon"] == pytest.approx(first["dp_epsilon"])
