"""The settings' journey to the apps (m2diff/runconfig.py), as a round trip through Flower's
own run-config parser: what the coordinator sends is what both apps compose."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args

from m2diff.config import ConfigError, compose
from m2diff.fedutil import compose_run_config, split_overrides
from m2diff.ops.flower import toml_pairs
from m2diff.runconfig import overrides_text, run_overrides
from m2diff.wire import OUT_DIR_KEY, OVERRIDES_KEY


@pytest.mark.parametrize(
    "words",
    [
        ["model=unet", "train.steps=5", "fl.rounds=1", "data.split=[0.5,0.25,0.25]"],
        ["model=paper", "privacy=dp", "train.lr=0.0003", "fl.strategy=fedprox"],
        [],
    ],
)
def test_a_config_comes_back_from_the_run_config(words):
    cfg = compose(words)
    values = {OUT_DIR_KEY: "/abs/out dir", OVERRIDES_KEY: overrides_text(run_overrides(cfg))}
    parsed = parse_config_args([toml_pairs(values)])
    assert parsed == values
    again = compose_run_config(parsed)
    for key in ("model", "train", "fl", "privacy", "sample", "seed"):
        assert again[key] == cfg[key], key
    assert list(again.data.split) == list(cfg.data.split)


def test_the_commands_own_words_come_back_whole():
    words = ["model=tiny", '++train.note="a b"', "fl.rounds=2"]
    assert split_overrides(overrides_text(words)) == words
    assert split_overrides('++a="x y" b=1') == ['++a="x y"', "b=1"]
    with pytest.raises(ConfigError, match="double quotes"):
        overrides_text(["train.note=a b"])
