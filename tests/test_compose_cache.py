"""The on-disk cache of composed configs (M2DIFF_COMPOSE_CACHE, m2diff/config.py)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from m2diff import config
from m2diff.config import COMPOSE_CACHE_ENV, ConfigError, compose

CASES = [[], ["model=tiny", "train.steps=3", "fl.transport=float16"],
         ["privacy=dp", "generate=realistic_tiny", "fl.rounds=7"]]


@pytest.mark.parametrize("overrides", CASES)
def test_cached_config_equals_a_fresh_composition(overrides, tmp_path, monkeypatch):
    fresh = compose(overrides)
    monkeypatch.setenv(COMPOSE_CACHE_ENV, str(tmp_path / "cache"))
    first = compose(overrides)  # composed, then written
    assert len(list((tmp_path / "cache").glob("*.yaml"))) == 1
    calls = []
    monkeypatch.setattr(config, "_compose", lambda o: calls.append(o))
    second = compose(overrides)  # read back, Hydra not called
    assert calls == []
    for cfg in (first, second):
        assert OmegaConf.to_container(cfg, resolve=False) == OmegaConf.to_container(fresh, resolve=False)
        assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(fresh, resolve=True)
        cfg.train.steps = 11  # as mutable as a fresh one (sites set their own values)
        cfg.brand_new = 1


def test_a_changed_conf_file_or_override_composes_afresh(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(config.conf_dir(), conf)
    monkeypatch.setenv("M2DIFF_CONF_DIR", str(conf))
    monkeypatch.setenv(COMPOSE_CACHE_ENV, str(tmp_path / "cache"))
    assert compose(["model=tiny"]).train.steps != 4242
    text = (conf / "train" / "default.yaml").read_text()
    (conf / "train" / "default.yaml").write_text(text.replace("steps:", "steps: 4242 #", 1))
    assert compose(["model=tiny"]).train.steps == 4242
    assert compose(["model=tiny", "train.steps=5"]).train.steps == 5
    assert len(list((tmp_path / "cache").glob("*.yaml"))) == 3
    with pytest.raises(ConfigError, match="nope"):
        compose(["model=nope"])


def test_a_broken_cache_file_is_composed_again(tmp_path, monkeypatch):
    monkeypatch.setenv(COMPOSE_CACHE_ENV, str(tmp_path))
    compose(["model=tiny"])
    (entry,) = tmp_path.glob("*.yaml")
    entry.write_text("{{{ not yaml")
    assert compose(["model=tiny"]).model.arch == "m2diff"
    assert OmegaConf.create(entry.read_text()).model.arch == "m2diff"  # rewritten
