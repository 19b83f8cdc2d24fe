"""What the ServerApp leaves in out-dir after every round, and resuming from it.

``checkpoint.pt``   the global model (m2diff.checkpoint, atomic: a kill keeps the previous)
                    with ``round`` = the last completed round
``rounds.json``     one row per round, site and cohort (evaluate metrics of the global
``rounds.csv``      model on the site's test subjects, the site's train metrics, timings)
``rounds.png``      m2diff.report.plot_rounds
``sites.json``      node id -> site name, as the sites' replies said
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from m2diff.checkpoint import load_checkpoint, save_checkpoint
from m2diff.fedutil import union_keys
from m2diff.report import plot_rounds, write_csv, write_json

CHECKPOINT = "checkpoint.pt"
ROUNDS_JSON = "rounds.json"
ROUNDS_CSV = "rounds.csv"
ROUNDS_PNG = "rounds.png"
SITES_FILE = "sites.json"


@dataclass
class Resume:
    """A previous run's global model and the last round it completed."""

    state_dict: dict[str, torch.Tensor]
    round: int
    server_state: dict[str, Any] = field(default_factory=dict)


def load_resume(out: Path) -> Resume | None:
    """The checkpoint in ``out`` to continue from, or None when there is none."""
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt.get("model"))
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: no model state in the checkpoint")
    extra = ckpt.get("extra") or {}
    return Resume(dict(state), int(extra.get("round", ckpt.get("round", 0))),
                  dict(extra.get("server_state") or {}))


def save_global(out: Path, model: torch.nn.Module, cfg: DictConfig, round_: int, **extra: Any) -> Path:
    """Atomically write the global model after ``round_``."""
    path = out / CHECKPOINT
    save_checkpoint(path, model, cfg, round=round_, **extra)
    return path


class RoundRecorder:
    """Per-round, per-site, per-cohort metric rows kept in rounds.json / rounds.csv."""

    def __init__(self, out: Path, keep_until: int = 0) -> None:
        """Load earlier rows of a resumed run, dropping rounds after ``keep_until``."""
        self.out = out
        self.rows: list[dict[str, Any]] = []
        path = out / ROUNDS_JSON
        if keep_until > 0 and path.is_file():
            try:
                self.rows = [r for r in json.loads(path.read_text()) if int(r["round"]) <= keep_until]
            except (ValueError, KeyError, TypeError):
                self.rows = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Append one round's rows and rewrite rounds.json, rounds.csv and rounds.png."""
        self.rows.extend(rows)
        write_json(self.out / ROUNDS_JSON, self.rows)
        write_csv(self.out / ROUNDS_CSV, self.rows, union_keys(self.rows))
        self._plot()

    def _plot(self) -> None:
        try:
            plot_rounds(self.rows, self.out / ROUNDS_PNG)
        except Exception as exc:  # a figure must never end a federation
            from flwr.supercore import log

            log(WARNING, "rounds.png not written: %s", exc)
