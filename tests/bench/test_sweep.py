"""Sweep planning: Hydra's multirun words -> settings and runs, shared and named by identity."""

from __future__ import annotations

import pytest

from m2diff.bench.sweep import identity_of, plan, unique_runs
from m2diff.config import ConfigError, compose


def test_default_sweep_is_every_mode_of_every_setting():
    settings = plan(["model=unet", "fl.strategy=fedavg,fedprox"])
    assert [s.label for s in settings] == ["fl.strategy=fedavg", "fl.strategy=fedprox"]
    for s in settings:
        assert sorted(s.runs) == ["centralized", "federated", "local"]
        assert s.runs["federated"].cfg.fl.strategy == s.label.split("=")[1]
        assert s.runs["local"].cfg.model.arch == "unet"
    # Centralised and local training do not depend on the strategy: one run each, shared.
    assert settings[0].runs["local"] is settings[1].runs["local"]
    assert settings[0].runs["centralized"] is settings[1].runs["centralized"]
    assert settings[0].runs["federated"].identity != settings[1].runs["federated"].identity
    assert len(unique_runs(settings)) == 4


def test_mode_all_and_explicit_modes_and_bench_defaults():
    (only,) = plan(["fl.mode=all"])
    assert sorted(only.runs) == ["centralized", "federated", "local"]
    cfg = only.runs["federated"].cfg
    assert int(cfg.train.steps) == 60 and list(cfg.generate.shape) == [32, 32, 8]  # CPU defaults
    (two,) = plan(["fl.mode=federated,local", "train.steps=7", "generate=default"])
    assert sorted(two.runs) == ["federated", "local"]
    assert int(two.runs["local"].cfg.train.steps) == 7
    assert list(two.runs["local"].cfg.generate.shape) == [64, 64, 24]


def test_cartesian_product_in_word_order_with_range_sweeps():
    settings = plan(["fl.mode=local", "train.lr=0.001,0.01", "generate.label_skew=range(0,1.5,1)"])
    assert [s.label for s in settings] == [
        "train.lr=0.001 generate.label_skew=0.0", "train.lr=0.001 generate.label_skew=1.0",
        "train.lr=0.01 generate.label_skew=0.0", "train.lr=0.01 generate.label_skew=1.0"]
    names = [s.runs["local"].name for s in settings]
    assert len(set(names)) == 4 and names[0].startswith("local_train.lr=0.001_generate.label_skew=0.0_")


def test_identity_ignores_where_a_run_goes_not_what_it_computes():
    base = compose(["fl.mode=federated"])
    same = compose(["fl.mode=federated", "out=elsewhere", "fl.num_cpus=2", "fl.ray_address=auto",
                    "generate.workers=1"])
    other = compose(["fl.mode=federated", "train.lr=0.5"])
    assert identity_of(base) == identity_of(same) != identity_of(other)
    # Client-level DP is a federation's: a local run under it is the plain local run...
    assert identity_of(compose(["fl.mode=local", "privacy=central_dp"])) == \
        identity_of(compose(["fl.mode=local"]))
    # ...but sample-level DP changes local training.
    assert identity_of(compose(["fl.mode=local", "privacy=dp"])) != identity_of(compose(["fl.mode=local"]))


@pytest.mark.parametrize("words, message", [
    (["out=a,b"], "cannot be swept"),
    (["fl.mode=sideways"], "fl.mode=sideways"),
    (["train.lr=1e-3,"], "bad sweep word"),
    (["model=nosuchmodel"], "nosuchmodel"),
])
def test_bad_words_are_config_errors_naming_them(words, message):
    with pytest.raises(ConfigError, match=message):
        plan(words)
