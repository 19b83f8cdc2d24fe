"""The site-aware strategies on constructed replies: names, rejections, dropped sites."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from omegaconf import OmegaConf

from server.strategy import STRATEGIES, build_strategy

SPEC = {"w": (2, 3), "b": (3,)}


def _fl(strategy: str = "fedavg", min_sites: int = 1):
    return OmegaConf.create({
        "strategy": strategy, "min_sites": min_sites, "fraction_train": 1.0,
        "fraction_evaluate": 1.0, "proximal_mu": 0.01, "server_lr": 0.01, "trim_beta": 0.2,
    })


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type=MessageType.TRAIN)


def _reply(node: int, site: str | None, value: float = 1.0, n: int = 10,
           arrays: dict | None = None, metrics: dict | None = None) -> Message:
    arrays = arrays if arrays is not None else {k: np.full(s, value, np.float32)
                                                for k, s in SPEC.items()}
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord(metrics if metrics is not None else
                                {"num-examples": n, "train_loss": 0.5}),
    })
    if site:
        content["site"] = ConfigRecord({"name": site})
    return Message(content=content, metadata=_meta(node))


def _error(node: int = 1) -> Message:
    return Message(error=Error(code=0, reason="node went away"), metadata=_meta(node))


def test_nan_update_is_rejected_and_named():
    strategy = build_strategy(_fl(), SPEC)
    poisoned = _reply(12, "site-b", value=np.nan)
    arrays, _ = strategy.aggregate_train(1, [_reply(11, "site-a", 1.0), poisoned,
                                             _reply(13, "site-c", 3.0)])
    assert arrays is not None
    w = arrays["w"].numpy()
    assert np.all(np.isfinite(w)) and np.allclose(w, 2.0)  # mean of 1 and 3, b ignored
    assert set(strategy.rejected[1]) == {"site-b"}
    assert "non-finite" in strategy.rejected[1]["site-b"]
    assert strategy.site_name(11) == "site-a"
    assert set(strategy.train_metrics[1]) == {"site-a", "site-c"}


def test_wrong_shape_extra_key_and_inconsistent_metrics_are_rejected():
    strategy = build_strategy(_fl(), SPEC)
    bad_shape = _reply(2, "s2", arrays={"w": np.ones((3, 2), np.float32),
                                        "b": np.ones(3, np.float32)})
    extra = _reply(3, "s3", arrays={**{k: np.ones(s, np.float32) for k, s in SPEC.items()},
                                    "spy": np.ones(1, np.float32)})
    odd_metrics = _reply(4, "s4", metrics={"num-examples": 5, "train_loss": 0.1, "x": 1.0})
    no_weight = _reply(5, "s5", metrics={"train_loss": 0.1})
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, "s1"), _reply(6, "s6"), bad_shape,
                                                   extra, odd_metrics, no_weight])
    assert arrays is not None and metrics is not None
    assert set(strategy.rejected[1]) == {"s2", "s3", "s4", "s5"}


def test_all_rejected_keeps_global_model():
    strategy = build_strategy(_fl(), SPEC)
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, "s1", value=np.inf)])
    assert arrays is None and metrics is None


def test_error_replies_are_survived():
    strategy = build_strategy(_fl(), SPEC)
    strategy._sent[(1, True)] = {11, 12}
    strategy.site_names[12] = "site-b"
    arrays, _ = strategy.aggregate_train(1, [_reply(11, "site-a", 4.0), _error(1)])
    assert np.allclose(arrays["w"].numpy(), 4.0)
    assert strategy.dropped[1] == ["site-b"]


def test_evaluate_keeps_per_site_metrics_and_handles_zero_weight():
    strategy = build_strategy(_fl(), SPEC)
    m = {"num-examples": 2, "cn_psnr": 30.0, "ad_psnr": 0.0, "ad_n": 0.0}
    replies = [_reply(1, "a", metrics=m), _reply(2, "b", metrics={**m, "cn_psnr": 20.0})]
    for r in replies:
        del r.content["arrays"]
    agg = strategy.aggregate_evaluate(1, replies)
    assert agg is not None and agg["cn_psnr"] == pytest.approx(25.0)
    assert strategy.evaluate_metrics[1]["b"]["cn_psnr"] == 20.0
    zero = _reply(3, "c", metrics={**m, "num-examples": 0})
    del zero.content["arrays"]
    assert strategy.aggregate_evaluate(2, [zero]) is None


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_rejects_nan(name):
    fl = _fl(name, min_sites=4)
    fl.trim_beta = 0.25  # trims 1 of 4
    strategy = build_strategy(fl, SPEC)
    if name == "fedadam":  # FedOpt needs the current global arrays from configure_train
        strategy.current_arrays = {k: np.zeros(s, np.float32) for k, s in SPEC.items()}
    replies = [_reply(1, "a", 1.0), _reply(2, "b", 2.0), _reply(3, "c", 3.0), _reply(5, "e", 2.5),
               _reply(4, "d", np.nan)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert all(np.all(np.isfinite(a.numpy())) for a in arrays.values())
    assert "d" in strategy.rejected[1]


@pytest.mark.parametrize("name,min_sites,beta,setting", [
    ("fedtrimmedavg", 4, 0.2, "fl.trim_beta=0.2 trims int(0.2 x 4) = 0"),
    ("fedtrimmedavg", 3, 0.3, "Raise fl.min_sites to >= 4"),
    ("fedtrimmedavg", 10, 0.5, "fl.trim_beta=0.5: must be in"),
    ("fedmedian", 2, 0.2, "fl.strategy=fedmedian with fl.min_sites=2"),
])
def test_robust_strategy_that_would_trim_nothing_is_a_config_error(name, min_sites, beta, setting):
    fl = _fl(name, min_sites=min_sites)
    fl.trim_beta = beta
    with pytest.raises(ValueError, match=re.escape(setting)):
        build_strategy(fl, SPEC)


def test_trimmed_mean_keeps_the_model_when_too_few_updates_arrive():
    fl = _fl("fedtrimmedavg", min_sites=5)  # beta 0.2 trims 1 of 5
    strategy = build_strategy(fl, SPEC)
    four = [_reply(n, f"s{n}", float(n)) for n in range(1, 5)]  # a site dropped out: 0 trimmed
    assert strategy.aggregate_train(1, four) == (None, None)
    assert "fewer than the 5" in strategy.not_aggregated[1]
    arrays, _ = strategy.aggregate_train(2, [*four, _reply(9, "s9", 100.0)])
    assert np.allclose(arrays["w"].numpy(), 3.0)  # 1 and 100 trimmed: mean of 2, 3, 4


def test_aggregation_that_raises_keeps_the_model_and_the_run():
    strategy = build_strategy(_fl(), SPEC)
    replies = [_reply(1, "a", 1.0), _reply(2, "b", 2.0)]
    # A list metric of different lengths passes the per-reply checks but breaks
    # Flower's metric averaging inside FedAvg.aggregate_train.
    replies[0].content["metrics"] = MetricRecord({"num-examples": 10, "train_loss": [1.0, 2.0]})
    replies[1].content["metrics"] = MetricRecord({"num-examples": 10, "train_loss": [1.0]})
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert "aggregation failed" in strategy.not_aggregated[1]


def test_weights_must_be_positive_integers_under_the_cap():
    fl = _fl()
    fl.update_check = {"max_num_examples": 100}
    strategy = build_strategy(fl, SPEC)
    replies = [_reply(1, "ok", 1.0, n=100), _reply(2, "float", 5.0, metrics={"num-examples": 10.0}),
               _reply(3, "big", 5.0, n=101), _reply(4, "zero", 5.0, n=0),
               _reply(5, "list", 5.0, metrics={"num-examples": [10]})]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), 1.0)
    assert set(strategy.rejected[1]) == {"float", "big", "zero", "list"}
    assert "outside 1..100" in strategy.rejected[1]["big"]
    # Evaluation: 0 test subjects is a valid answer, a negative count is not.
    zero = _reply(6, "no-test", metrics={"num-examples": 0, "cn_psnr": 1.0})
    neg = _reply(7, "neg", metrics={"num-examples": -3, "cn_psnr": 1.0})
    strategy.aggregate_evaluate(1, [zero, neg])
    assert set(strategy.rejected_evaluate[1]) == {"neg"} and "no-test" in strategy.evaluate_metrics[1]


def test_registered_names_cannot_be_claimed_by_another_node():
    from server.site_names import format_registered, parse_registered

    strategy = build_strategy(_fl(), SPEC)
    strategy.registered = parse_registered(format_registered({"1": "site-a", "2": "site-b"}))
    replies = [_reply(1, "site-a", 1.0), _reply(2, "site-a", 5.0), _reply(3, "site-b", 5.0),
               _reply(4, "x[/bold]", 5.0), _reply(5, "newcomer", 3.0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), 2.0)  # site-a (1.0) and the unregistered newcomer (3.0)
    assert set(strategy.rejected[1]) == {"site-b", "node-3", "node-4"}
    assert "registered as 'site-b'" in strategy.rejected[1]["site-b"]
    assert strategy.site_name(2) == "site-b" and strategy.site_name(5) == "newcomer"
    with pytest.raises(ValueError, match="NODE_ID=SITE_NAME"):
        parse_registered("12=a/b")


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="fl.strategy"):
        build_strategy(_fl("fedfoo"), SPEC)


def test_privacy_dp_run_rejects_a_site_that_trained_without_dp():
    strategy = build_strategy(_fl(min_sites=2), SPEC)
    strategy.require_dp = True
    replies = [_reply(1, "dp-site", 1.0, metrics={"num-examples": 10, "train_loss": 0.5,
                                                   "dp_epsilon": 1.2, "dp_refused": 0}),
               _reply(2, "plain-site", 3.0, metrics={"num-examples": 10, "train_loss": 0.5})]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), 1.0)  # only the DP site's weights
    assert "without DP-SGD" in strategy.rejected[1]["plain-site"]


def test_site_that_requires_dp_refuses_a_run_without_it():
    from types import SimpleNamespace

    from flwr.app import Context, RecordDict

    from client.app import check_required_privacy
    from client.site import SiteError

    def ctx(required):
        return Context(run_id=1, node_id=1, node_config={"require-privacy": required} if required else {},
                       state=RecordDict(), run_config={})

    def run(kind):
        return SimpleNamespace(name="hosp-a", cfg=OmegaConf.create({"privacy": {"kind": kind}}))

    with pytest.raises(SiteError, match="site hosp-a requires privacy=dp .* this run uses privacy=none"):
        check_required_privacy(ctx("dp"), run("none"))
    check_required_privacy(ctx("dp"), run("dp"))
    check_required_privacy(ctx(None), run("none"))
    with pytest.raises(SiteError, match="requires privacy=central_dp"):
        check_required_privacy(ctx("central_dp"), run("dp"))


def test_fedadam_moments_survive_a_resume(tmp_path):
    from m2diff.config import compose
    from server.checkpoint import load_resume, save_global

    def fresh():
        s = build_strategy(_fl("fedadam", min_sites=1), SPEC)
        s.current_arrays = {k: np.zeros(sh, np.float32) for k, sh in SPEC.items()}
        return s

    def round_(s, rnd, value):
        arrays, _ = s.aggregate_train(rnd, [_reply(1, "a", value), _reply(2, "b", value)])
        s.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        return arrays

    straight = fresh()
    round_(straight, 1, 1.0)
    expected = round_(straight, 2, -0.5)

    first = fresh()
    round_(first, 1, 1.0)
    cfg = compose(["model=tiny"])
    from m2diff.model import build_model
    save_global(tmp_path, build_model(cfg.model), cfg, 1, server_state=first.server_state())
    resume = load_resume(tmp_path)
    assert resume is not None and set(resume.server_state) == {"m_t", "v_t"}
    resumed = fresh()
    resumed.current_arrays = dict(first.current_arrays)
    resumed.load_server_state(resume.server_state)
    got = round_(resumed, 2, -0.5)
    for k in SPEC:
        np.testing.assert_allclose(got[k].numpy(), expected[k].numpy(), rtol=1e-6)
    # Without the moments the second round differs: the test can tell.
    blind = fresh()
    blind.current_arrays = dict(first.current_arrays)
    assert not np.allclose(round_(blind, 2, -0.5)["w"].numpy(), expected["w"].numpy())
    assert build_strategy(_fl("fedavg"), SPEC).server_state() == {}


def test_the_settings_check_names_exactly_the_strategies_built():
    """m2diff-server checks fl.strategy without importing the strategies: both lists agree."""
    from server.strategy_settings import STRATEGY_NAMES

    assert tuple(STRATEGIES) == STRATEGY_NAMES
