"""One bench run in its own folder: resolved config, training, held-out rows, ``run.json``.

Folder ``<bench out>/runs/<run name>/``: ``config.yaml`` (the resolved config it ran with),
the outputs of its mode (federated: ``rounds.json`` / ``rounds.csv`` / ``checkpoint.pt`` /
``superlink.log``; centralised and local: ``rows.json`` and a checkpoint per model) and
``run.json``, written last and atomically: ``status`` (done | failed), ``identity``, ``mode``,
``words``, ``rows`` (m2diff.fedutil.metric_rows of the held-out subjects), ``sites`` (site
name -> usable subjects), ``wall_s``, ``error``. A run whose ``run.json`` says done with the
same identity is not run again; a failed or interrupted one is (a federation resumes from its
last checkpointed round: ``fl.resume``).

Generated sites live under ``<bench out>/data/<12 hex digits of their settings>`` (or under
``generate.out`` when that is set away from its default), one folder per distinct generator
setting, so a sweep over ``generate.*`` keys never mixes sites.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from m2diff.bench.sweep import Run
from m2diff.config import ConfigError, compose, resolve_path, to_yaml
from m2diff.report import _atomic_write, write_json

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"


def run_folder(root: Path, run: Run) -> Path:
    """``<root>/runs/<run.name>``, or the folder of an earlier sweep with the same identity
    (names end in ``_<identity>``; the readable part depends on what that sweep varied)."""
    earlier = sorted((root / "runs").glob(f"*_{run.identity}"))
    return earlier[0] if earlier else root / "runs" / run.name


def load_result(folder: Path) -> dict[str, Any] | None:
    """``run.json`` of a run folder, None when missing or unreadable (the run is redone)."""
    try:
        data = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_done(root: Path, run: Run) -> bool:
    result = load_result(run_folder(root, run))
    return bool(result and result.get("status") == "done" and result.get("identity") == run.identity)


def generator_cfg(cfg: DictConfig, root: Path) -> DictConfig:
    """The generator settings of a run: ``cfg.generate`` with ``fl.sites`` sites, written to a
    folder named after the settings (see the module doc)."""
    from m2diff.simulate import generation_key

    gen = cfg.generate.copy()
    gen.sites = int(cfg.fl.sites)
    digest = hashlib.sha256(json.dumps(generation_key(gen, int(cfg.seed)), sort_keys=True,
                                       default=str).encode()).hexdigest()[:12]
    default_out = compose([]).generate.out
    base = resolve_path(gen.out) if str(gen.out) != str(default_out) else root / "data"
    gen.out = str(Path(str(base)) / digest)
    return gen


def _site_sizes(sites: list[Path]) -> dict[str, int]:
    from m2diff.data.validate import validate_site

    return {p.name: len(validate_site(p)[0].subjects) for p in sites}


def execute(run: Run, root: Path) -> dict[str, Any]:
    """Run ``run`` into its folder (unless done) and return its ``run.json`` content.

    Never raises for a failed run (a Flower run that did not complete, a setting one mode
    cannot take, a crash): it is recorded with ``status: failed`` and the reason.
    """
    from m2diff.simulate import ensure_sites, run_mode

    folder = run_folder(root, run)
    done = load_result(folder)
    if done and done.get("status") == "done" and done.get("identity") == run.identity:
        return {**done, "skipped": True}
    folder.mkdir(parents=True, exist_ok=True)
    cfg = run.cfg.copy()
    cfg.out = str(folder)
    result: dict[str, Any] = {"identity": run.identity, "mode": run.mode, "words": list(run.words)}
    start = time.perf_counter()
    try:
        gen = generator_cfg(cfg, root)
        if not cfg.data.get("path"):
            cfg.generate = gen
        _atomic_write(folder / CONFIG_FILE, lambda fh: fh.write(to_yaml(cfg)))
        sites = ensure_sites(cfg, gen)
        sizes = _site_sizes(sites)
        rows = run_mode(cfg, sites, folder)
        result.update(status="done" if rows else "failed", rows=rows, sites=sizes,
                      error=None if rows else "no held-out rows (did any site train and evaluate?)")
    except Exception as exc:  # noqa: BLE001 - one broken run must not end the sweep
        kind = "setting" if isinstance(exc, ConfigError) else type(exc).__name__
        result.update(status="failed", rows=[], error=f"{kind}: {exc}")
        text = traceback.format_exc()
        _atomic_write(folder / "error.log", lambda fh: fh.write(text))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(folder / RUN_FILE, result)
    return result

