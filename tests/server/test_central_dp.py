"""privacy=central_dp on constructed replies: wrapper per config, noise, clipping, epsilon."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from omegaconf import OmegaConf
from opacus.accountants import RDPAccountant

from server.privacy import ClientLevelAccountant, effective_noise_multiplier, wrap_central_dp
from server.strategy import build_strategy
from tests.server.test_strategy import SPEC, _fl, _meta, _reply

N_SITES = 4


def _privacy(**kw):
    base = {"kind": "central_dp", "clipping": "fixed", "side": "server", "noise_multiplier": 1.0,
            "clipping_norm": 1.0, "num_sampled_clients": None, "population": None,
            "delta": 1e-5, "target_clipped_quantile": 0.5, "clip_norm_lr": 0.2,
            "clipped_count_stddev": None}
    return OmegaConf.create({**base, **kw})


def _wrapped(strategy="fedavg", **kw):
    fl = _fl(strategy, min_sites=N_SITES)
    fl.sites = N_SITES
    site = build_strategy(fl, SPEC)
    return site, wrap_central_dp(site, _privacy(**kw), fl)


def _start(dp):
    """What configure_train records: the global arrays the updates are relative to."""
    dp.current_arrays = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SPEC.items()})


@pytest.mark.parametrize("clipping,side,cls", [
    ("fixed", "server", DifferentialPrivacyServerSideFixedClipping),
    ("fixed", "client", DifferentialPrivacyClientSideFixedClipping),
    ("adaptive", "server", DifferentialPrivacyServerSideAdaptiveClipping),
    ("adaptive", "client", DifferentialPrivacyClientSideAdaptiveClipping),
])
def test_wrapper_follows_config(clipping, side, cls):
    site, dp = _wrapped(clipping=clipping, side=side)
    assert isinstance(dp, cls)
    assert dp.site is site and dp.num_sampled_clients == N_SITES and dp.sample_rate == 1.0


def test_non_mean_strategy_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="fl.strategy"):
        _wrapped("fedmedian")
    with pytest.raises(ValueError, match="clipping"):
        _wrapped(clipping="sometimes")
    with pytest.raises(ValueError, match="num_sampled_clients"):
        _wrapped(num_sampled_clients=N_SITES + 1)


def test_noise_std_matches_noise_multiplier_times_norm_over_sites():
    z, c = 2.0, 0.5
    _, dp = _wrapped(noise_multiplier=z, clipping_norm=c)
    _start(dp)
    value = 0.01  # update norm sqrt(9) * 0.01 < c: no clipping
    np.random.seed(0)
    arrays, _ = dp.aggregate_train(1, [_reply(i, f"s{i}", value) for i in range(N_SITES)])
    noise = np.concatenate([(arrays[k].numpy() - value).ravel() for k in SPEC])
    expected = z * c / N_SITES
    assert abs(noise.std() - expected) < 0.5 * expected  # 9 draws
    # Many draws: the std is close to z * c / n.
    draws = []
    for rnd in range(2, 60):
        _start(dp)
        a, _ = dp.aggregate_train(rnd, [_reply(i, f"s{i}", value) for i in range(N_SITES)])
        draws.append(np.concatenate([(a[k].numpy() - value).ravel() for k in SPEC]))
    assert np.std(np.concatenate(draws)) == pytest.approx(expected, rel=0.1)


def test_huge_update_is_clipped():
    _, dp = _wrapped(noise_multiplier=1e-6, clipping_norm=1.0)  # ~no noise
    _start(dp)
    replies = [_reply(1, "big", 1e6)] + [_reply(i, f"s{i}", 1e-4) for i in range(2, N_SITES + 1)]
    arrays, _ = dp.aggregate_train(1, replies)
    total = np.sqrt(sum(float(np.sum(arrays[k].numpy() ** 2)) for k in SPEC))
    assert total == pytest.approx(1.0 / N_SITES, rel=1e-2)  # the big site clipped to norm 1


def test_site_checks_run_before_clipping():
    site, dp = _wrapped(noise_multiplier=1e-6)
    _start(dp)
    replies = [_reply(i, f"s{i}", 0.1) for i in range(1, N_SITES)]
    replies.append(_reply(9, "bad", arrays={"w": np.ones((3, 2), np.float32),
                                             "b": np.ones(3, np.float32)}))  # wrong shape
    arrays, _ = dp.aggregate_train(1, replies)
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 0.1, atol=1e-4)
    assert set(site.rejected[1]) == {"bad"}
    # Three of four sites: the round is counted with a smaller effective noise multiplier.
    assert dp.ledger.history == [[1, pytest.approx(0.75e-6), 1.0]]


def test_epsilon_grows_and_equals_a_fresh_opacus_accountant():
    _, dp = _wrapped(noise_multiplier=1.5, num_sampled_clients=2)
    assert dp.sample_rate == 0.5 and dp.epsilon() == 0.0
    eps = []
    for rnd in (1, 2, 3):
        _start(dp)
        dp.aggregate_train(rnd, [_reply(1, "a", 0.01), _reply(2, "b", 0.01)])
        eps.append(dp.epsilon())
    assert 0 < eps[0] < eps[1] < eps[2]
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.5, sample_rate=0.5)
    assert eps[2] == pytest.approx(acc.get_epsilon(delta=1e-5))


def test_unequal_weights_lower_the_counted_noise():
    assert effective_noise_multiplier(1.0, 4, [10, 10, 10, 10]) == 1.0
    assert effective_noise_multiplier(1.0, 4, [10, 10, 20]) == pytest.approx(40 / 80)


def test_ledger_keeps_released_rounds_and_is_required_to_resume(tmp_path):
    from server.privacy import LedgerMissing

    led = ClientLevelAccountant(1e-5)
    for r in (1, 2, 3):
        led.step(r, 1.0, 1.0)
    led.save(tmp_path / "l.json")
    assert not list(tmp_path.glob(".l.json.tmp*"))  # atomic writer: no temp file left
    # The checkpoint is at round 2, but round 3's noised model was released before the crash:
    # it stays counted (and the rerun of round 3 counts again).
    back = ClientLevelAccountant.load(tmp_path / "l.json", 1e-5, keep_until=2)
    assert len(back.history) == 3 and back.epsilon() == pytest.approx(led.epsilon())
    back.step(3, 1.0, 1.0)
    back.save()  # to the file it was loaded from
    assert len(ClientLevelAccountant.load(tmp_path / "l.json", 1e-5, 3).history) == 4
    # A fresh run needs no ledger; a resumed one does.
    assert ClientLevelAccountant.load(tmp_path / "none.json", 1e-5, keep_until=0).epsilon() == 0
    with pytest.raises(LedgerMissing, match="none.json is missing but the checkpoint is at round 2"):
        ClientLevelAccountant.load(tmp_path / "none.json", 1e-5, keep_until=2)


def test_client_side_sends_norm_and_the_mod_clips():
    from client.app import central_dp_mod

    _, dp = _wrapped(side="client", clipping_norm=1.0)
    sent = {}

    class _Inner:  # stands in for the site strategy (building Messages needs a running Flower)
        def configure_train(self, rnd, arrays, config, grid):
            sent.update(dict(config))
            return []

    dp.strategy = _Inner()
    zeros = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SPEC.items()})
    dp.configure_train(1, zeros, ConfigRecord({}), None)
    assert sent["clipping_norm"] == 1.0 and sent["central-dp-clipping"] == "fixed"
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def _train_msg(config):
        return Message(content=RecordDict({"arrays": zeros, "config": ConfigRecord(config)}),
                       metadata=_meta(1))

    out = central_dp_mod(_train_msg(sent), ctx, lambda m, c: _reply(1, "a", 100.0))
    norm = np.sqrt(sum(float(np.sum(a ** 2)) for a in out.content["arrays"].to_numpy_ndarrays()))
    assert norm == pytest.approx(1.0, rel=1e-5)
    # Without a clipping norm in the config (server side / no central DP) nothing changes.
    out = central_dp_mod(_train_msg({}), ctx, lambda m, c: _reply(1, "a", 100.0))
    assert out.content["arrays"]["w"].numpy()[0, 0] == 100.0


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_zero_update_is_left_out_on_the_server_not_a_crash(clipping):
    # Flower's clipping divides by the update norm: a site that made no step would end the run.
    site, dp = _wrapped(clipping=clipping, noise_multiplier=1e-6)
    _start(dp)
    replies = [_reply(1, "still", 0.0)] + [_reply(i, f"s{i}", 0.1) for i in range(2, N_SITES + 1)]
    arrays, _ = dp.aggregate_train(1, replies)
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 0.1, atol=1e-3)
    assert set(site.train_metrics[1]) == {"still", "s2", "s3", "s4"}  # reported, not averaged


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_zero_update_passes_the_client_clipping_mod(clipping):
    from client.app import central_dp_mod

    zeros = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SPEC.items()})
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    config = {"clipping_norm": 1.0, "central-dp-clipping": clipping}
    msg = Message(content=RecordDict({"arrays": zeros, "config": ConfigRecord(config)}),
                  metadata=_meta(1))
    out = central_dp_mod(msg, ctx, lambda m, c: _reply(1, "a", 0.0))
    assert not out.has_error()
    assert all(not a.any() for a in out.content["arrays"].to_numpy_ndarrays())
    if clipping == "adaptive":
        assert next(iter(out.content.metric_records.values()))["norm_bit"] == 0


def test_noise_that_outweighs_any_update_is_named():
    """The default client-level DP of a 3-site federation drowns the tiny model (0.62 M
    weights): noise norm 1 x sqrt(0.62 M) / 3 = ~260 x the largest mean update. Refused with
    the numbers unless allowed (then the same words are the warning); a federation large
    enough for the noise passes quietly."""
    from server.privacy import noise_to_update, refuse_drowned_updates

    privacy = OmegaConf.create({"noise_multiplier": 1.0, "num_sampled_clients": None,
                                "population": None, "allow_noise_dominated": False})
    fl = OmegaConf.create({"sites": 3, "fraction_train": 1.0, "min_sites": 3})
    assert noise_to_update(privacy, fl, 620_000) == pytest.approx(np.sqrt(620_000) / 3)
    with pytest.raises(ValueError, match="262 x the largest possible mean update.*privacy=dp"):
        refuse_drowned_updates(privacy, fl, 620_000)
    privacy.allow_noise_dominated = True
    assert "262 x the largest" in refuse_drowned_updates(privacy, fl, 620_000)
    big = OmegaConf.create({"sites": 1000, "fraction_train": 1.0, "min_sites": 3})
    assert noise_to_update(privacy, big, 620_000) < 1
    privacy.allow_noise_dominated = False
    assert refuse_drowned_updates(privacy, big, 620_000) is None
