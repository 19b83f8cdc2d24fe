"""``m2diff simulate [key=value ...]``: a whole federation on this machine.

Generates the default sites (healthy-only, AD-heavy, mixed) under ``generate.out`` when they
are missing (the tiny generator preset unless a ``generate.*`` key is changed). The CPU main
job trains ``SIM_STEPS`` steps per site and round unless ``train.steps`` is changed from
its default (200 steps x 3 rounds x 3 sites take ~10 min on 2 busy cores). Then:

- ``fl.mode=federated`` (default): the repository's Flower app on Flower's simulation engine
  (Ray): a simulation SuperLink on a free local port, ``flwr run`` with one virtual SuperNode
  per site (``fl.num_cpus`` / ``fl.num_gpus`` each; ``fl.ray_address`` joins an existing Ray
  cluster), the SuperLink stopped by PID afterwards. Output in ``<out>/federated``.
- ``fl.mode=centralized``: pooled training subjects of all sites, the same total number of
  optimiser steps as the federation (rounds x steps x sites), no Flower.
- ``fl.mode=local``: each site alone for rounds x steps, no Flower.
- ``fl.mode=all``: the three above on the same sites and budget (``<out>/<mode>``), then one
  table with the LD input, federated, centralised and local rows per site and cohort
  (``<out>/compare.csv`` / ``compare.md``). ``m2diff bench`` sweeps settings (m2diff/bench/).

With ``privacy=dp`` centralised and local training are DP-SGD too (Opacus, the noise for
their own number of steps), and their rows carry the epsilon spent; client-level DP
(``privacy=central_dp``) protects sites of a federation and has no meaning without one.

Each ends with the same table: per site and cohort, PSNR / SSIM / NMSE / SUVR bias of the
LD input and of the trained model on the site's held-out test subjects.
Flower is imported only inside the federated path (``m2diff`` stays Flower-free).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from m2diff.config import ConfigError, compose, resolve_path
from m2diff.fedutil import metric_rows, table_columns, table_rows
from m2diff.runconfig import overrides_text, run_overrides
from m2diff.wire import OUT_DIR_KEY, OVERRIDES_KEY, SIM_SITES_KEY

REPO = Path(__file__).resolve().parents[1]
SIM_STEPS = 60  # train.steps per round of the main job when train.steps is left at its default


# ----------------------------------------------------------------------------- sites
def generate_cfg(cfg: DictConfig) -> DictConfig:
    """The generator settings: the tiny preset unless the user changed a generate key."""
    gen = cfg.generate
    if OmegaConf.to_container(gen) == OmegaConf.to_container(compose([]).generate):
        gen = compose(["generate=tiny"]).generate
        gen.out = cfg.generate.out
    gen.sites = int(cfg.fl.sites)
    return gen


STAMP = ".m2diff-generate.json"  # in generate.out: the settings its sites were generated with


def generation_key(gen: DictConfig, seed: int) -> dict[str, Any]:
    """What decides the generated voxels: the generator settings (minus where and with how
    many workers) and the seed; stored beside generated sites and compared on reuse."""
    plain = OmegaConf.to_container(gen, resolve=True)
    assert isinstance(plain, dict)
    return {"seed": int(seed), **{k: v for k, v in plain.items() if k not in ("out", "workers")}}


def ensure_sites(cfg: DictConfig, gen: DictConfig | None = None) -> list[Path]:
    """``data.path`` folders when given, else the generated sites of ``gen`` (default
    ``generate_cfg(cfg)``), generated when missing. Sites generated with other settings
    (``STAMP``) are never reused: ConfigError names the folder."""
    if cfg.data.get("path"):
        from m2diff.data.check import site_paths

        return site_paths(cfg.data.path)
    from m2diff.data.generate.cohort import generate_sites, plan_sites
    from m2diff.data.generate.settings import read_settings
    from m2diff.report import write_json

    gen = generate_cfg(cfg) if gen is None else gen
    out = resolve_path(gen.out)
    assert out is not None
    key = generation_key(gen, int(cfg.seed))
    if (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) != key:
        raise ConfigError(f"{out} holds sites generated with other generate.* settings or seed "
                          f"(see {out / STAMP}); pass generate.out=ANOTHER_DIR or remove it")
    expected = [out / plan.name for plan in plan_sites(read_settings(gen), int(cfg.seed))]
    if all((p / "participants.tsv").is_file() for p in expected):
        return expected
    print(f"m2diff simulate: generating {gen.sites} sites under {out}", flush=True)
    sites = list(generate_sites(gen, out, seed=int(cfg.seed), progress=True))
    write_json(out / STAMP, key)
    return sites


# ----------------------------------------------------------------------------- modes
def run_federated(cfg: DictConfig, sites: list[Path], out: Path) -> list[dict[str, Any]]:
    """The Flower app on the simulation engine; rows of the last round (rounds.json)."""
    from m2diff.ops import FlowerError
    from m2diff.ops.flower import private_federation, run_outcome, tool
    from m2diff.ops.procs import free_port, stop_group, wait_port

    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    extra = {"RAY_ADDRESS": str(cfg.fl.ray_address)} if cfg.fl.get("ray_address") else {}
    ctl = private_federation("sim", f"127.0.0.1:{port}", insecure=True, extra=extra)  # loopback only
    with open(out / "superlink.log", "ab") as log:
        link = subprocess.Popen(
            [tool("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(port), "--disable-runtime-dependency-installation"],
            cwd=out, env=ctl.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port("127.0.0.1", port, link, "simulation SuperLink", log=f"{out}/superlink.log")
        cpus = float(cfg.fl.num_cpus)
        federation = {"num-supernodes": len(sites),
                      "client-resources-num-cpus": int(cpus) if cpus.is_integer() else cpus,
                      "client-resources-num-gpus": float(cfg.fl.num_gpus)}
        run_config = {OUT_DIR_KEY: str(out), OVERRIDES_KEY: overrides_text(run_overrides(cfg)),
                      SIM_SITES_KEY: ",".join(str(p) for p in sites)}
        run_id = ctl.submit(REPO, run_config, federation)
        print(f"m2diff simulate: Flower run {run_id}: {len(sites)} virtual sites, "
              f"{cfg.fl.rounds} rounds x {cfg.train.steps} steps", flush=True)
        row = _wait(ctl, run_id, float(cfg.fl.rounds) * float(cfg.fl.round_timeout) + 600)
        ok, text = run_outcome(row)
        traffic = row.get("network-traffic", {})
        print(f"m2diff simulate: run {run_id} {text} in {row.get('elapsed', 0):.0f} s "
              f"(traffic {traffic.get('total-bytes', 0) / 2**20:.1f} MB)", flush=True)
        if not ok:
            raise FlowerError(f"federated run {text}; see {out}/superlink.log")
    finally:
        stop_group(link)
        ctl.close()
    rows = json.loads((out / "rounds.json").read_text()) if (out / "rounds.json").is_file() else []
    last = max((int(r["round"]) for r in rows), default=0)
    return [r for r in rows if int(r["round"]) == last]


def _wait(ctl: Any, run_id: int, timeout: float) -> dict[str, Any]:
    """``Federation.wait`` that survives a slow ``flwr ls``: on a busy machine (many sites,
    niced processes) one poll can take over its 60 s while the run goes on; poll again (no
    second log stream) until the run ends or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    stream = True
    while True:
        try:
            return ctl.wait(run_id, timeout=max(1.0, deadline - time.monotonic()), stream=stream)
        except subprocess.TimeoutExpired as exc:
            if time.monotonic() > deadline:
                raise
            print(f"m2diff simulate: {exc}; polling again", flush=True)
            stream = False


def _evaluate(model: Any, cfg: DictConfig, site: Any, device: Any, rnd: int) -> list[dict[str, Any]]:
    import torch

    from m2diff.data.splits import split_subjects
    from m2diff.evaluate import evaluate_subjects, site_metrics

    test = split_subjects(site.subjects, cfg.data.split, int(cfg.seed))["test"]
    model.eval()
    with torch.no_grad():
        rows = evaluate_subjects(model, cfg, site, test, device)
    return metric_rows(rnd, site.name, site_metrics(rows, method=str(cfg.model.arch)))


def _train(model: Any, slices: Any, cfg: DictConfig, steps: int, device: Any) -> tuple[Any, float | None]:
    """``train_steps`` for ``steps`` steps; with ``privacy=dp`` DP-SGD whose noise (from
    ``privacy.target_epsilon`` when set) is planned for exactly these steps. Returns the
    TrainResult and the epsilon spent (None without sample-level DP)."""
    import torch

    from m2diff.train import make_optimizer, train_steps

    if str(cfg.privacy.get("kind", "none")) != "dp":
        return train_steps(model, slices, cfg, steps, device=device, progress=True), None
    from m2diff.privacy import epsilon, make_private

    planned = cfg.copy()
    planned.fl.rounds, planned.train.steps = steps, 1  # noise_multiplier plans rounds x steps
    private, optimizer, loader, engine = make_private(
        model, make_optimizer(model, cfg.train), slices, planned,
        generator=torch.Generator().manual_seed(int(cfg.seed)))
    result = train_steps(private, slices, cfg, steps, optimizer=optimizer, device=device,
                         progress=True, loader=loader)
    return result, epsilon(engine, float(cfg.privacy.delta))


def run_without_flower(cfg: DictConfig, sites: list[Path], out: Path) -> list[dict[str, Any]]:
    """``fl.mode=centralized`` (pooled) or ``local`` (each site alone) with m2diff.train."""
    import torch

    from m2diff.checkpoint import save_checkpoint
    from m2diff.data.dataset import SliceSet, load_slices
    from m2diff.data.validate import validate_site
    from m2diff.device import resolve_device
    from m2diff.model import build_model
    from m2diff.report import write_json

    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    checked = [validate_site(p)[0] for p in sites]
    usable = [s for s in checked if s.subjects]
    rounds, steps = int(cfg.fl.rounds), int(cfg.train.steps)
    groups = [usable] if cfg.fl.mode == "centralized" else [[s] for s in usable]
    rows: list[dict[str, Any]] = []
    for group in groups:
        torch.manual_seed(int(cfg.seed))
        model = build_model(cfg.model)
        slices = SliceSet.concat([load_slices(s, "train", cfg.data, int(cfg.seed), int(model.stride))
                                  for s in group])
        total = rounds * steps * (len(usable) if cfg.fl.mode == "centralized" else 1)
        name = "pooled" if len(group) > 1 else group[0].name
        print(f"m2diff simulate: {cfg.fl.mode} training on {name}: {total} steps, "
              f"{len(slices)} slices", flush=True)
        result, eps = _train(model, slices, cfg, total, device)
        # EMA weights for evaluation, like m2diff train's checkpoint.
        eval_model = model
        if result.ema is not None:
            eval_model = result.ema.copy_to(build_model(cfg.model).to(device))
        save_checkpoint(out / f"checkpoint-{name}.pt", eval_model, cfg, steps=total)
        targets = usable if cfg.fl.mode == "centralized" else group
        for site in targets:
            site_rows = _evaluate(eval_model, cfg, site, device, rounds)
            if eps is not None:  # what this model's training cost in privacy (sample level)
                for row in site_rows:
                    row["train_dp_epsilon"] = eps
            rows += site_rows
    write_json(out / "rows.json", rows)
    return rows


def run_mode(cfg: DictConfig, sites: list[Path], out: Path) -> list[dict[str, Any]]:
    """One of ``fl.mode`` federated | centralized | local into ``out``: its table rows
    (m2diff.fedutil.metric_rows). Raises m2diff.ops.FlowerError when a federation fails."""
    if str(cfg.fl.mode) == "federated":
        return run_federated(cfg, sites, out)
    return run_without_flower(cfg, sites, out)


def run_all(cfg: DictConfig, sites: list[Path], out: Path, start: float) -> int:
    """``fl.mode=all``: federated, centralised and local on the same sites and budget, one
    table (also ``<out>/compare.csv`` and ``compare.md``)."""
    from m2diff.bench.summary import compare_rows, write_compare
    from m2diff.ops import FlowerError
    from m2diff.report import print_table

    results: dict[str, list[dict[str, Any]]] = {}
    for mode in ("federated", "centralized", "local"):
        run = cfg.copy()
        run.fl.mode = mode
        try:
            results[mode] = run_mode(run, sites, out / mode)
        except FlowerError as exc:
            print(f"m2diff simulate: {mode}: {exc}", flush=True)
            results[mode] = []
    table = compare_rows(results)
    write_compare(out, table)
    print_table(table, f"federated vs centralized vs local: held-out test subjects per site and "
                f"cohort, same budget ({out})", table_columns(table))
    print(f"m2diff simulate: all modes done in {time.perf_counter() - start:.0f} s; results in {out}")
    return 0 if all(results.values()) else 1


def run_simulate(cfg: DictConfig, args: dict[str, str]) -> int:
    """CLI entry (see module doc); exit status 0 on success, 1 when the run failed."""
    mode = str(cfg.fl.mode)
    if mode not in ("federated", "centralized", "local", "all"):
        raise ConfigError(f"fl.mode={mode}: choose federated, centralized, local or all")
    start = time.perf_counter()
    if int(cfg.train.steps) == int(compose([]).train.steps):
        cfg.train.steps = SIM_STEPS
        print(f"m2diff simulate: train.steps={SIM_STEPS} per site and round "
              "(the CPU main job's default; pass train.steps=N to change)", flush=True)
    sites = ensure_sites(cfg)
    out = resolve_path(cfg.out)
    assert out is not None
    if mode == "all":
        return run_all(cfg, sites, out, start)
    out = out / mode
    if mode == "federated":
        from m2diff.ops import FlowerError

        try:
            rows = run_federated(cfg, sites, out)
        except FlowerError as exc:
            print(f"m2diff simulate: {exc}", flush=True)
            return 1
    else:
        rows = run_without_flower(cfg, sites, out)
    from m2diff.report import print_table

    label = {"federated": "federated", "centralized": "centralized", "local": "local"}[mode]
    table = table_rows(rows, label)
    print_table(table, f"{mode}: held-out test subjects per site and cohort ({out})",
                table_columns(table))
    print(f"m2diff simulate: {mode} done in {time.perf_counter() - start:.0f} s; results in {out}")
    return 0 if rows else 1
