"""Quality benchmark: LD input vs UNet regression vs single-pathway DDPM vs M2Diff.

    .venv/bin/python benchmarks/quality.py [key=value ...]

Generates (or reuses) simulated sites, trains ``unet``, ``ddpm_concat`` and ``m2diff`` on the
same training subjects of every site for the same budget (``train.steps``), evaluates all of
them on the held-out (test) subjects and prints one table per cohort (CN, AD), pooled over
sites: PSNR, SSIM, NMSE, SUVR bias, train time and sampling time per volume. The tables are
also written as markdown (``<out>/quality.md``, for the README) with the per-subject CSV/JSON.

Keys: any config override (``train.steps=2000 model.channels=[64,128,128] device=cuda
generate.subjects=24 generate.shape=[128,128,48]``), plus
``sites_dir=DIR`` (simulated sites; reused when generated with the same settings),
``methods=unet,ddpm_concat,m2diff,m2diff_residual`` (the last diffuses SD - LD) and ``regenerate=true``.
The default budget (3 sites x 8 subjects of 48 x 48 x 16, 300 steps per model, DDIM 25 steps)
takes about 10-15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m2diff.config import compose, resolve_path  # noqa: E402
from m2diff.data.layout import Site  # noqa: E402

# CPU defaults; every one of them can be overridden on the command line.
DEFAULTS = [
    "generate.sites=3", "generate.subjects=8", "generate.shape=[48,48,16]",
    "generate.angles=64", "generate.mlem_iters=15",
    "train.steps=300", "train.batch_size=16", "train.lr=1e-3",
    "data.split=[0.6,0.0,0.4]", "sample.steps=25", "out=runs/benchmark-quality",
]
# method -> (model config group, extra overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "unet": ("unet", []),
    "ddpm_concat": ("ddpm_concat", []),
    "m2diff": ("tiny", []),
    "m2diff_residual": ("tiny", ["model.target=residual"]),
}
COLUMNS = ("method", "n", "psnr", "ssim", "nmse", "suvr_bias_pct", "train_s", "sample_s")
OWN_KEYS = ("sites_dir", "methods", "regenerate")


def parse(argv: list[str], overrides: list[str] | None = None, own: dict[str, str] | None = None,
          own_keys: tuple[str, ...] | None = None, script: str = "quality.py"
          ) -> tuple[list[str], dict[str, str]]:
    """Split ``key=value`` words into config overrides (after ``overrides``, default
    ``DEFAULTS``) and the script's own keys (``own_keys``, starting from ``own``)."""
    overrides = list(DEFAULTS if overrides is None else overrides)
    own = dict(own or {})
    keys = OWN_KEYS if own_keys is None else own_keys
    for word in argv:
        key, sep, value = word.partition("=")
        if not sep:
            raise SystemExit(f"{script}: '{word}' is not key=value")
        if key in keys:
            own[key] = value
        else:
            overrides.append(word)
    return overrides, own


def sites(cfg: Any, sites_dir: Path, regenerate: bool) -> list[Site]:
    """Generate the simulated sites into ``sites_dir`` unless the same settings are there."""
    from m2diff.data.validate import validate_site

    stamp = sites_dir / "generate.json"
    wanted = {"generate": OmegaConf.to_container(cfg.generate, resolve=True), "seed": int(cfg.seed)}
    if regenerate or not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        from m2diff.data.simulate.cohort import generate_sites

        if sites_dir.exists():
            shutil.rmtree(sites_dir)
        start = time.perf_counter()
        print(f"generating {cfg.generate.sites} sites x {cfg.generate.subjects} subjects "
              f"{list(cfg.generate.shape)} into {sites_dir} ...", flush=True)
        generate_sites(cfg.generate, sites_dir, seed=int(cfg.seed), progress=True)
        stamp.write_text(json.dumps(wanted))
        print(f"generated in {time.perf_counter() - start:.0f} s", flush=True)
    else:
        print(f"reusing simulated sites in {sites_dir}", flush=True)
    out = []
    for root in sorted(p for p in sites_dir.iterdir() if (p / "participants.tsv").is_file()):
        site, problems = validate_site(root)
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        out.append(site)
    return out


def train_method(method: str, overrides: list[str], all_sites: list[Site], device: torch.device):
    """Build and train one architecture on the train split of every site; returns
    (model (EMA weights if any), cfg, train seconds)."""
    from m2diff.data.dataset import SliceSet, load_slices
    from m2diff.model import build_model
    from m2diff.train import train_steps

    group, extra = METHODS[method]
    cfg = compose([f"model={group}", *overrides, *extra])
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model).to(device)
    slices = SliceSet.concat([load_slices(s, "train", cfg.data, int(cfg.seed), model.stride)
                              for s in all_sites])
    print(f"training {method}: {len(slices)} slices, {cfg.train.steps} steps on {device} ...",
          flush=True)
    result = train_steps(model, slices, cfg, int(cfg.train.steps), device=device, progress=True)
    print(f"  {method}: final loss {result.loss:.4f}, {result.seconds:.0f} s", flush=True)
    # Evaluate what a checkpoint would hold: the EMA weights when train.ema_decay > 0.
    trained = result.ema.copy_to(model) if result.ema is not None else model
    return trained.eval(), cfg, float(result.seconds)


def test_subjects(cfg: Any, site: Site) -> list:
    from m2diff.data.splits import split_subjects

    return split_subjects(site.subjects, list(cfg.data.split), int(cfg.seed))["test"]


def cohort_tables(rows: list[dict], timings: dict[str, float]) -> dict[str, list[dict]]:
    """Per cohort: one row per method (LD input first), pooled over sites."""
    from m2diff.evaluate import LD_METHOD, summarise

    tables: dict[str, list[dict]] = {}
    for item in summarise(rows):
        if item["site"] != "pooled":
            continue
        row = dict(item)
        row["train_s"] = timings.get(item["method"], float("nan")) if item["method"] != LD_METHOD else float("nan")
        row["sample_s"] = item.get("seconds", float("nan"))
        row["sample_s_std"] = float("nan")
        tables.setdefault(item["cohort"], []).append(row)
    return tables


def main(argv: list[str]) -> int:
    from m2diff.enhance import run_device
    from m2diff.evaluate import LD_METHOD, evaluate_subjects
    from m2diff.metrics import PROTOCOL
    from m2diff.report import markdown_table, print_table, write_csv, write_json

    overrides, own = parse(argv)
    cfg = compose(["model=tiny", *overrides])
    device = run_device(cfg)
    out = resolve_path(cfg.out)
    sites_dir = resolve_path(own.get("sites_dir", "data/benchmark-sim"))
    all_sites = sites(cfg, sites_dir, own.get("regenerate", "false").lower() == "true")
    held_out = {s.name: test_subjects(cfg, s) for s in all_sites}
    print("held-out subjects: " + ", ".join(f"{k} {len(v)}" for k, v in held_out.items()))

    rows: list[dict] = []
    for site in all_sites:  # the LD input row: no training
        rows += [r for r in evaluate_subjects(None, cfg, site, held_out[site.name], device)]
    timings: dict[str, float] = {}
    methods = [m.strip() for m in own.get("methods", "unet,ddpm_concat,m2diff").split(",") if m.strip()]
    for method in methods:
        if method not in METHODS:
            raise SystemExit(f"quality.py: unknown method {method} (expected {', '.join(METHODS)})")
        model, mcfg, timings[method] = train_method(method, overrides, all_sites, device)
        start = time.perf_counter()
        for site in all_sites:
            rows += [r for r in evaluate_subjects(model, mcfg, site, held_out[site.name], device,
                                                  name=method) if r["method"] != LD_METHOD]
        print(f"  {method}: evaluated in {time.perf_counter() - start:.0f} s", flush=True)
        del model

    tables = cohort_tables(rows, timings)
    budget = (f"train.steps={cfg.train.steps}, batch {cfg.train.batch_size}, lr {cfg.train.lr}; "
              f"sampling {cfg.sample.sampler} {cfg.sample.steps} steps; device {device}; "
              f"{len(all_sites)} sites x {cfg.generate.subjects} subjects "
              f"{list(cfg.generate.shape)}")
    md = [f"Protocol: {PROTOCOL}", "", f"Budget: {budget}.", ""]
    for cohort in ("CN", "AD", "all"):
        if cohort not in tables:
            continue
        title = f"{cohort}: held-out subjects pooled over sites (mean ± std per subject)"
        print_table(tables[cohort], title, COLUMNS)
        md += [f"**{title}**", "", markdown_table(tables[cohort], COLUMNS), ""]
    text = "\n".join(md)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(text + "\n")
    write_csv(out / "quality_subjects.csv", rows)
    write_json(out / "quality.json", {"protocol": PROTOCOL, "budget": budget, "subjects": rows,
                                      "tables": tables, "overrides": overrides})
    print(f"wrote {out / 'quality.md'}, quality_subjects.csv, quality.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
