"""Sample-level DP (privacy=dp): accounting across rounds, the budget refusal (client reply
and server strategy), clean weight names, that a DP tiny model still learns, and the site's
privacy policy: one lifetime ledger per site (a new out-dir gives no fresh budget), a lost
ledger, the noise floor, evaluate refused in runs below the site's privacy."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from omegaconf import OmegaConf
from opacus.accountants import RDPAccountant

from client.app import app
from client.privacy import federation_key, state_path
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

DP = "model=tiny train.steps=2 train.batch_size=2 device=cpu sample.steps=2 privacy=dp"


def _message(arrays: ArrayRecord, node: int, rnd: int, kind: str = MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})})
    meta = Metadata(run_id=1, message_id=f"m{node}-{rnd}", src_node_id=1, dst_node_id=node,
                    reply_to_message_id="", group_id=str(rnd), created_at=0.0, ttl=600.0,
                    message_type=kind)
    return Message(content=content, metadata=meta)


def _send(site_dir, node: int, rnd: int, arrays: ArrayRecord, overrides: str, out_dir: str = "",
          kind: str = MessageType.TRAIN, **node_extra: str) -> Message:
    """One message through the real ClientApp; ``node_extra``: the site's node config."""
    node_config = {"data-path": str(site_dir), **{k.replace("_", "-"): v for k, v in node_extra.items()}}
    ctx = Context(run_id=next(_run_ids), node_id=node, node_config=node_config,
                  state=RecordDict(), run_config={"overrides": overrides, "out-dir": out_dir})
    return app(_message(arrays, node, rnd, kind), ctx)


def _train(site_dir, node: int, rnd: int, arrays: ArrayRecord, budget: str = "null",
           out_dir: str = "", **node_extra: str) -> Message:
    reply = _send(site_dir, node, rnd, arrays, f"{DP} privacy.noise_multiplier=1.0 "
                  f"privacy.budget_epsilon={budget}", out_dir, **node_extra)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


def _metrics(reply: Message) -> dict:
    return dict(next(iter(reply.content.metric_records.values())))


def _arrays(reply: Message) -> ArrayRecord:
    return next(iter(reply.content.array_records.values()))


@pytest.fixture(scope="module")
def global_arrays(tiny_cfg) -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(build_model(tiny_cfg.model).state_dict())


def test_client_accounts_across_rounds_refuses_at_budget_and_server_drops_it(tiny_sites, tiny_cfg,
                                                                             tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model)
    plain = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    arrays = ArrayRecord(model.state_dict())
    out = str(tmp_path / "fed")
    a, b = tiny_sites[0], tiny_sites[2]
    state = {7: str(tmp_path / "state-a"), 8: str(tmp_path / "state-b")}

    # Round 1: both sites train; the weights carry the plain model's names.
    r1 = {node: _train(site, node, 1, arrays, out_dir=out, state_dir=state[node])
          for node, site in ((7, a), (8, b))}
    for reply in r1.values():
        record = _arrays(reply)
        assert {k: tuple(v.shape) for k, v in record.items()} == plain
        assert not any(k.startswith("_module") for k in record)
        m = _metrics(reply)
        assert m["dp_refused"] == 0 and m["dp_epsilon"] > 0 and m["train_steps"] == 2
        assert m["dp_epsilon_next"] == pytest.approx(m["dp_epsilon"])
    eps_b1 = _metrics(r1[8])["dp_epsilon"]

    # Round 2: site a trains on; site b's budget would be exceeded: it refuses.
    global2 = _arrays(r1[7])
    ra = _train(a, 7, 2, global2, out_dir=out, state_dir=state[7])
    rb = _train(b, 8, 2, global2, budget=str(eps_b1 * 1.01), out_dir=out, state_dir=state[8])
    ma, mb = _metrics(ra), _metrics(rb)
    assert ma["dp_epsilon"] > _metrics(r1[7])["dp_epsilon"]  # cumulative: rounds 1..2
    assert mb["dp_refused"] == 1 and mb["train_steps"] == 0
    assert mb["dp_epsilon"] == pytest.approx(eps_b1)  # nothing more spent
    assert mb["dp_epsilon_next"] > eps_b1 * 1.01  # what the round would have cost
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


def test_one_ledger_per_site_a_new_out_dir_gives_no_fresh_budget(tiny_sites, tmp_path,
                                                                 global_arrays):
    """The attack: a site refused at its budget; the coordinator changes out-dir to get a
    fresh ledger. Now the ledger is the site's (state-dir), whatever the run config says."""
    site = tiny_sites[1]
    node = {"state_dir": str(tmp_path / "state"), "cache_dir": str(tmp_path / "cache")}
    fed_a, fed_b = str(tmp_path / "fed-a"), str(tmp_path / "fed-b")
    first = _metrics(_train(site, 7, 1, global_arrays, out_dir=fed_a, **node))
    assert first["dp_refused"] == 0
    eps1 = first["dp_epsilon"]
    # The hospital's cap lets one such round in, not two.
    entry = json.loads((tmp_path / "state" / "dp-ledger.json").read_text())["entries"][0]
    eps2 = epsilon([(entry["noise"], entry["rate"], entry["steps"])] * 2, DELTA)
    cap = {"max_epsilon": str((eps1 + eps2) / 2), **node}
    attack = _metrics(_train(site, 7, 1, global_arrays, out_dir=fed_b, **cap))
    assert attack["dp_refused"] == 1 and attack["train_steps"] == 0
    assert attack["dp_epsilon"] == 0.0  # federation b's own count: nothing spent there
    assert attack["dp_epsilon_next"] == pytest.approx(eps1)
    # A resumed federation (new run id, same out-dir) continues its count.
    resumed = _metrics(_train(site, 7, 2, global_arrays, out_dir=fed_a + "/", **node))
    assert resumed["dp_refused"] == 0 and resumed["dp_epsilon"] > eps1
    # One ledger, written twice (state folder + cache copy), two entries of federation a.
    primary, copy = tmp_path / "state" / "dp-ledger.json", tmp_path / "cache" / "dp-ledger.json"
    ctx = Context(run_id=1, node_id=7, node_config={"data-path": str(site), "state-dir": node["state_dir"],
                                                    "cache-dir": node["cache_dir"]},
                  state=RecordDict(), run_config={"overrides": "privacy=dp", "out-dir": fed_a})
    assert state_path(ctx, SiteRun.open(ctx)) == primary
    assert primary.read_text() == copy.read_text()
    entries = json.loads(primary.read_text())["entries"]
    assert [e["federation"] for e in entries] == [federation_key(ctx, SiteRun.open(ctx))] * 2
    assert fed_a not in primary.read_text()  # a hash, not the coordinator's path


def test_a_lost_ledger_refuses_until_restored(tiny_sites, tmp_path, global_arrays):
    site = tiny_sites[1]
    node = {"state_dir": str(tmp_path / "state"), "cache_dir": str(tmp_path / "cache")}
    _train(site, 7, 1, global_arrays, **node)
    primary, copy = tmp_path / "state" / "dp-ledger.json", tmp_path / "cache" / "dp-ledger.json"
    primary.unlink()
    reply = _send(site, 7, 2, global_arrays, f"{DP} privacy.noise_multiplier=1.0", **node)
    assert reply.has_error() and reply.error.reason == "site-policy"
    shutil.copy(copy, primary)
    assert _metrics(_train(site, 7, 2, global_arrays, **node))["dp_refused"] == 0
    copy.unlink()  # a cleared cache: the copy is written again
    _train(site, 7, 3, global_arrays, **node)
    assert len(json.loads(copy.read_text())["entries"]) == 3


def test_tiny_noise_and_no_budget_is_refused(tiny_sites, tmp_path, global_arrays):
    """Found in review: noise_multiplier=0.001 budget_epsilon=null trained (epsilon 1.1e6)."""
    site = tiny_sites[1]
    attack = f"{DP} privacy.noise_multiplier=0.001 privacy.budget_epsilon=null privacy.target_epsilon=null"
    node = {"state_dir": str(tmp_path / "state")}
    reply = _send(site, 7, 1, global_arrays, attack, **node)  # below the site's noise floor
    assert reply.has_error() and reply.error.reason == "site-policy"
    # A site that waives the floor is still held by its lifetime max-epsilon (default 10).
    m = _metrics(_send(site, 7, 1, global_arrays, attack, min_noise_multiplier="0", **node))
    assert m["dp_refused"] == 1 and m["train_steps"] == 0 and m["dp_epsilon_next"] > 1e3
    assert not (tmp_path / "state" / "dp-ledger.json").exists()  # nothing was spent


def test_evaluate_and_train_refused_in_runs_below_the_sites_privacy(tiny_sites, tmp_path,
                                                                     global_arrays):
    site = tiny_sites[1]
    node = {"require_privacy": "dp", "state_dir": str(tmp_path / "state")}
    plain = "model=tiny train.steps=2 train.batch_size=2 sample.steps=2"
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = _send(site, 7, 1, global_arrays, plain, kind=kind, **node)
        assert reply.has_error() and reply.error.reason == "site-policy", kind
    reply = _send(site, 7, 1, global_arrays, f"{DP} privacy.noise_multiplier=1.0",
                  kind=MessageType.EVALUATE, **node)
    assert not reply.has_error() and _metrics(reply)["all_n"] >= 1
    # SecAgg+ required: a plain train message is refused before anything runs.
    reply = _send(site, 7, 1, global_arrays, f"{DP} fl.secagg.enabled=true",
                  require_secagg="true", **node)
    assert reply.has_error() and reply.error.reason == "site-policy"


def test_central_dp_only_with_the_sites_own_clipping(tiny_sites):
    from client.app import central_dp_mod
    from client.site_errors import SitePolicyError
    from client.site_policy import SitePolicy, check_privacy
    from m2diff.config import compose

    def ctx(node):
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    w = ArrayRecord({"w": Array(np.zeros((3,), np.float32))})

    def msg(config):
        meta = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=1,
                        reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                        message_type=MessageType.TRAIN)
        return Message(content=RecordDict({"arrays": w, "config": ConfigRecord(config)}),
                       metadata=meta)

    def trained(m, c):  # an update of norm 100
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.array([100.0, 0, 0], np.float32))}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)

    site = {"require-privacy": "central_dp", "clip-norm": "0.5"}
    with pytest.raises(SitePolicyError, match="server-side clipping"):
        central_dp_mod(msg({"server-round": 1}), ctx(site), trained)  # the raw update would leave
    out = central_dp_mod(msg({"clipping_norm": 100.0, "central-dp-clipping": "fixed"}), ctx(site),
                         trained)
    assert float(np.linalg.norm(out.content["arrays"]["w"].numpy())) == pytest.approx(0.5, rel=1e-5)
    policy = SitePolicy.from_node_config(site)
    with pytest.raises(SitePolicyError, match="privacy.side=client"):
        check_privacy(compose(["privacy=central_dp"]), policy, "hosp")
    with pytest.raises(SitePolicyError, match="clip-norm"):
        check_privacy(compose(["privacy=central_dp", "privacy.side=client"]), policy, "hosp")
    check_privacy(compose(["privacy=central_dp", "privacy.side=client",
                           "privacy.clipping_norm=0.5"]), policy, "hosp")
