"""Flower-free helpers shared by the ServerApp, the ClientApp and ``m2diff simulate``.

Everything here works on plain numpy / torch / DictConfig so it can be tested without
Flower: composing the config from a Flower run config, checking a site's model update,
the FedProx proximal term, and turning per-site metric dicts into table rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from m2diff.config import compose
from m2diff.wire import EPSILON_KEYS

# Cohort prefixes of the flat per-site metric dict (m2diff.evaluate.site_metrics).
COHORTS = ("cn", "ad", "all")


def compose_run_config(run_config: Mapping[str, Any]) -> DictConfig:
    """Compose the m2diff config from a Flower run config's ``overrides`` string.

    The ServerApp and every ClientApp call this with the same run config, so both sides
    train and evaluate with identical settings. ``overrides`` is space-separated Hydra
    key=value words (``"model=tiny fl.rounds=1 train.steps=5"``); a value with spaces is
    double-quoted Hydra-style (``++a.b="x y"``) and the quotes reach Hydra unchanged.
    """
    return compose(split_overrides(str(run_config.get("overrides", "") or "")))


def split_overrides(text: str) -> list[str]:
    """Space-separated override words; double-quoted parts are kept whole, quotes included."""
    return re.findall(r'(?:[^\s"]|"[^"]*")+', text)


def array_spec(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a state dict: what every site's update must match."""
    return {k: tuple(np.shape(v)) for k, v in arrays.items()}


def dtype_spec(arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Names and numpy dtypes (``'float32'``) of a state dict."""
    return {k: str(np.asarray(v).dtype) for k, v in arrays.items()}


def update_problems(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str] | None = None,
) -> list[str]:
    """What is wrong with one site's model update (empty list: usable).

    Checks the parameter names, shapes and (with ``dtypes``) numpy dtypes against the
    global model's and that every value is finite. Never raises for bad data: a string,
    complex or object array is a problem to report, not an exception.
    """
    problems: list[str] = []
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing:
        problems.append(f"missing arrays {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected arrays {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key, value in arrays.items():
        if key not in expected:
            continue
        dtype = np.asarray(value).dtype
        if dtypes is not None and key in dtypes and str(dtype) != dtypes[key]:
            problems.append(f"{key}: dtype {dtype} != {dtypes[key]}")
        elif tuple(np.shape(value)) != tuple(expected[key]):
            problems.append(f"{key}: shape {tuple(np.shape(value))} != {tuple(expected[key])}")
        elif not np.issubdtype(dtype, np.number) and dtype != np.bool_:
            problems.append(f"{key}: dtype {dtype} is not numeric")
        elif np.issubdtype(dtype, np.number) and not np.all(np.isfinite(value)):
            problems.append(f"{key}: non-finite values")
    return problems


def weight_problem(value: Any, cap: int, allow_zero: bool = False) -> str | None:
    """What is wrong with a reply's ``num-examples`` (FedAvg's weight), None when usable:
    it must be an integer (not a float such as 1e15, not a bool) in ``1..cap`` (``0..cap``
    with ``allow_zero``: an evaluation on a site without test subjects)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        return f"num-examples {value!r} is not an integer"
    low = 0 if allow_zero else 1
    if not low <= int(value) <= cap:
        return f"num-examples {int(value)} is outside {low}..{cap} (fl.update_check.max_num_examples)"
    return None


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - reference`` over all floating-point arrays, in float64 (so a
    finite 3e38 update gives a finite, huge norm instead of overflowing)."""
    total = 0.0
    for key, ref in reference.items():
        ref = np.asarray(ref)
        if not np.issubdtype(ref.dtype, np.floating) or key not in arrays:
            continue
        diff = np.asarray(arrays[key], dtype=np.float64) - ref.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def model_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the floating-point arrays of a model, in float64."""
    total = 0.0
    for value in arrays.values():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            flat = value.astype(np.float64).ravel()
            total += float(np.dot(flat, flat))
    return math.sqrt(total)


def metric_problems(metrics: Mapping[str, Any]) -> list[str]:
    """Non-numeric or non-finite metric values of one reply."""
    bad = []
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            bad.append(key)
    return [f"non-finite metric {k}" for k in bad]


def add_proximal_term(optimizer: torch.optim.Optimizer, model: torch.nn.Module, mu: float) -> None:
    """FedProx on the site: before every optimiser step add ``mu * (w - w_global)`` to the
    gradients, where ``w_global`` is the model as received this round.

    Works with any optimiser (and with gradient clipping, which acts before the hook).
    """
    if mu <= 0:
        return
    anchors = {p: p.detach().clone() for p in model.parameters() if p.requires_grad}

    def _hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, anchor in anchors.items():
            if p.grad is not None:
                p.grad.add_(p.detach() - anchor, alpha=mu)

    optimizer.register_step_pre_hook(_hook)


def split_site_metrics(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"cn_psnr": 30.1, "ad_n": 2, ...}`` -> ``{"cn": {"psnr": 30.1}, "ad": {"n": 2}}``.

    Keys whose prefix is not a cohort (``num-examples``, ``ld_cn_psnr`` style keys are
    handled by their cohort part) are dropped; a key ``ld_<cohort>_<metric>`` becomes
    ``ld_<metric>`` of that cohort so the LD input sits beside the model.
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("_")
        prefix = ""
        if parts[0] in ("ld", "input") and len(parts) > 2:
            prefix, parts = "ld_", parts[1:]
        if parts[0] not in COHORTS or len(parts) < 2:
            continue
        out.setdefault(parts[0], {})[prefix + "_".join(parts[1:])] = float(value)
    return out


def metric_rows(
    round_: int, site: str, metrics: Mapping[str, float], train: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """One table row per cohort of one site's evaluate metrics (+ its train metrics)."""
    rows = []
    for cohort, values in split_site_metrics(metrics).items():
        row: dict[str, Any] = {"round": round_, "site": site, "cohort": cohort.upper()}
        row.update(values)
        if "eval_seconds" in metrics:  # the site's own evaluation time (not per cohort)
            row["eval_seconds"] = float(metrics["eval_seconds"])
        for key, value in (train or {}).items():
            row[f"train_{key}" if not key.startswith("train") else key] = value
        rows.append(row)
    return rows


def union_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Column names of a list of dict rows, in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return list(keys)


TABLE_COLUMNS = ("site", "cohort", "n", "method", "psnr", "ssim", "nmse", "suvr_bias_pct")


def table_rows(rows: Iterable[Mapping[str, Any]], method: str) -> list[dict[str, Any]]:
    """Round rows (``metric_rows``) -> two table rows per site and cohort: the LD input and
    ``method`` (e.g. "federated"), with the column keys of ``TABLE_COLUMNS``. Cohorts without
    test subjects (n = 0) are left out."""
    out: list[dict[str, Any]] = []
    for row in rows:
        if int(row.get("n", 0)) == 0:
            continue
        base = {"site": row["site"], "cohort": row["cohort"], "n": int(row.get("n", 0))}
        for name, prefix in (("LD input", "ld_"), (method, "")):
            out.append({**base, "method": name,
                        **{k: row.get(prefix + short) for k, short in
                           (("psnr", "psnr"), ("ssim", "ssim"), ("nmse", "nmse"),
                            ("suvr_bias_pct", "suvr_bias"))}})
        eps = privacy_spent(row)
        if eps is not None:
            out[-1]["epsilon"] = eps  # the model's row: what its training cost in privacy
    return out




def privacy_spent(row: Mapping[str, Any]) -> float | None:
    """The cumulative epsilon a round row reports (sample-level DP of its site, else
    client-level DP of the federation), None without DP."""
    for key in EPSILON_KEYS:
        if row.get(key) is not None:
            return float(row[key])
    return None


def table_columns(table: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """``TABLE_COLUMNS``, plus ``epsilon`` when a row of ``table_rows`` carries one."""
    return TABLE_COLUMNS + (("epsilon",) if any("epsilon" in r for r in table) else ())


def format_site_table(rows: Iterable[Mapping[str, Any]], method: str = "federated") -> str:
    """Plain-text (markdown) table per site and cohort, LD input beside the model."""
    from m2diff.report import markdown_table

    table = table_rows(rows, method)
    return markdown_table(table, table_columns(table))
