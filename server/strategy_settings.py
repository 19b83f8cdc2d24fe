"""The federation's strategy settings, checked before anything starts (no torch, no Flower).

``m2diff-server`` refuses bad ``fl.*`` settings here before it starts a SuperLink;
``server/strategy.py`` builds the strategies from them; SecAgg+ and central DP name the
strategies whose aggregate is a weighted mean (``MEAN_STRATEGIES``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")
# Strategies whose aggregate is the (weighted) mean: what SecAgg+ yields and what central
# DP's noise is calibrated to.
MEAN_STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class UpdateLimits:
    """What one site's reply may be (``fl.update_check``; see the module doc)."""

    max_num_examples: int = 1_000_000
    norm_vs_median: float = 10.0
    norm_vs_model: float = 100.0

    @classmethod
    def from_config(cls, fl: Mapping[str, Any]) -> UpdateLimits:
        section = fl.get("update_check") or {}
        limits = cls(**{k: type(getattr(cls, k))(section[k]) for k in
                        ("max_num_examples", "norm_vs_median", "norm_vs_model") if k in section})
        if limits.max_num_examples < 1:
            raise ValueError(f"fl.update_check.max_num_examples={limits.max_num_examples} must be >= 1")
        for key in ("norm_vs_median", "norm_vs_model"):
            value = getattr(limits, key)
            if not (value == 0 or (value >= 1 and math.isfinite(value))):
                raise ValueError(f"fl.update_check.{key}={value} must be 0 (off) or >= 1")
        return limits


MEDIAN_MIN_SITES = 3


def trim_needs(beta: float) -> int:
    """Fewest updates of which Flower's trimmed mean (``int(beta * n)`` cut from each end)
    drops at least one on each side."""
    if not 0 < beta < 0.5:
        return 10**9
    return next(n for n in range(3, 10**6) if int(beta * n) >= 1)


def check_strategy(fl: Mapping[str, Any]) -> None:
    """Refuse, naming the setting, a strategy that does not exist or a robust one whose
    settings make it trim nothing (a plain mean that one site can poison); and bad
    ``fl.update_check`` limits."""
    name = str(fl["strategy"]).lower()
    if name not in STRATEGY_NAMES:
        raise ValueError(f"fl.strategy={fl['strategy']}: choose one of {', '.join(STRATEGY_NAMES)}")
    n = int(fl["min_sites"])
    if name == "fedtrimmedavg":
        beta = float(fl["trim_beta"])
        if not 0 < beta < 0.5:
            raise ValueError(f"fl.trim_beta={beta}: must be in (0, 0.5) (the share cut from each end)")
        if int(beta * n) < 1:
            raise ValueError(f"fl.strategy=fedtrimmedavg with fl.trim_beta={beta} trims int({beta} x "
                             f"{n}) = 0 of fl.min_sites={n} updates: nothing would be trimmed. Raise "
                             f"fl.min_sites to >= {trim_needs(beta)}, raise fl.trim_beta to >= "
                             f"{1 / max(n, 1):.3g} (< 0.5), or use fl.strategy=fedmedian")
    if name == "fedmedian" and n < MEDIAN_MIN_SITES:
        raise ValueError(f"fl.strategy=fedmedian with fl.min_sites={n}: the median of fewer than "
                         f"{MEDIAN_MIN_SITES} updates is their mean; raise fl.min_sites to >= "
                         f"{MEDIAN_MIN_SITES}")
    UpdateLimits.from_config(fl)
