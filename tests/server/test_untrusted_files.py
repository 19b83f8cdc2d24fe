"""Files the coordinator reads back are checked before they are trusted: a checkpoint that asks
for a huge model, a central-DP run resumed without its privacy ledger."""

from __future__ import annotations

import resource

import pytest
import torch
from flwr.app import RecordDict
from flwr.supercore.task_identity import TaskIdentity

from m2diff.checkpoint import FORMAT, CheckpointError, load_model, model_state_bytes
from m2diff.config import compose


def _tiny_hostile_checkpoint(path, **model_changes) -> None:
    from omegaconf import OmegaConf

    model_cfg = {**OmegaConf.to_container(compose(["model=tiny"]).model), **model_changes}
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(1)}, "model_cfg": model_cfg,
                "cfg": {}, "extra": {}}, path)


def test_a_small_checkpoint_cannot_make_us_build_a_huge_model(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wide = tmp_path / "wide.pt"
    _tiny_hostile_checkpoint(wide, channels=[1024, 1024, 1024])
    assert wide.stat().st_size < 4096
    count, size = model_state_bytes(compose(["model=tiny", "model.channels=[1024,1024,1024]"]).model)
    assert size > 2 * 2**30  # what it asks for (sized on the meta device, not allocated)
    with pytest.raises(CheckpointError, match=f"asks for {count} weights, the file holds 1"):
        load_model(wide)
    wider = tmp_path / "wider.pt"
    _tiny_hostile_checkpoint(wider, channels=[4096, 4096, 4096])
    with pytest.raises(CheckpointError, match=r"asks for a 52.8 GiB model \(at most 16 GiB\)"):
        load_model(wider)
    huge = tmp_path / "huge.pt"
    _tiny_hostile_checkpoint(huge, channels=[2**20, 2**20, 2**20])
    with pytest.raises(CheckpointError, match=r"model.channels\[0\]=1048576 is larger than 65536"):
        load_model(huge)
    deep = tmp_path / "deep.pt"
    _tiny_hostile_checkpoint(deep, channels=list(range(8, 8 * 200, 8)))
    with pytest.raises(CheckpointError, match="model.channels has 199 entries"):
        load_model(deep)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 1024, f"peak memory grew by {grown_mb:.0f} MB"


def test_a_central_dp_run_is_not_resumed_without_its_ledger(tmp_path):
    from m2diff.model import build_model
    from server.app import app
    from server.checkpoint import save_global
    from server.privacy import LedgerMissing
    from tests.server.test_poisoning import ReplyGrid, honest

    overrides = ("model=tiny fl.rounds=2 fl.min_sites=2 fl.sites=2 device=cpu privacy=central_dp "
                 "privacy.allow_noise_dominated=true privacy.noise_multiplier=1.0")
    cfg = compose(overrides.split())
    save_global(tmp_path, build_model(cfg.model), cfg, 1)  # round 1 done, central_dp.json lost
    from flwr.app import Context

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"out-dir": str(tmp_path), "overrides": overrides})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        grid = ReplyGrid({1: honest(1), 2: honest(2)})
        with pytest.raises(LedgerMissing, match="central_dp.json is missing but the checkpoint is at round 1"):
            app(grid, ctx)  # type: ignore[arg-type]
        assert grid.sent == []  # refused before anything reached a site
        # With the ledger the run resumes: round 2 releases, counted and saved.
        (tmp_path / "central_dp.json").write_text('{"delta": 1e-05, "history": [[1, 1.0, 1.0]]}')
        app(grid, ctx)  # type: ignore[arg-type]
        import json

        history = json.loads((tmp_path / "central_dp.json").read_text())["history"]
        assert [int(r[0]) for r in history] == [1, 2]
    finally:
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def test_central_dp_whose_noise_drowns_every_update_is_refused(tmp_path):
    """``privacy=central_dp`` with its defaults on a few sites: the noise (1 x sqrt(0.62 M) / 2
    = ~390 x the largest mean update) would replace the model with noise (measured: site-a
    34.6 -> 25.8 dB on the main job's sites). The ServerApp refuses before any site is asked,
    naming the numbers and the way out."""
    from flwr.app import Context

    from server.app import app
    from tests.server.test_poisoning import ReplyGrid, honest

    overrides = "model=tiny fl.rounds=1 fl.min_sites=2 fl.sites=2 device=cpu privacy=central_dp"
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"out-dir": str(tmp_path), "overrides": overrides})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        grid = ReplyGrid({1: honest(1), 2: honest(2)})
        with pytest.raises(ValueError, match=r"privacy=central_dp refused: client-level DP noise is "
                                             r"\d+ x the largest possible mean update.*privacy=dp"):
            app(grid, ctx)  # type: ignore[arg-type]
        assert grid.sent == []
    finally:
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None
