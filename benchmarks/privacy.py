"""Privacy benchmark: what sample-level DP (Opacus DP-SGD) costs in time and in image quality.

    .venv/bin/python benchmarks/privacy.py [key=value ...]

(a) Time per training step, without DP and with DP in the same process, on the same fixed
    16-slice batches of the simulated sites of benchmarks/quality.py: tiny M2Diff without
    DP, with Opacus' per-sample-gradient hooks (K = 1), with torch.func per-sample gradients
    at K = 1 and at noise multiplicity K = 4, and the UNet regression without / with DP.
    The cases take turns (round robin, ``timing_repeats`` times ``timing_steps`` steps each);
    the table gives the median CPU seconds per step of this single-threaded process (robust
    to other jobs on a shared machine) beside the median wall time, and the CPU-time ratio
    to the same model's no-DP case.
(b) Utility: each method trained centrally on the pooled training slices of all sites for a
    fixed number of steps, without DP (epsilon = inf) and with DP-SGD whose noise is set to
    spend ``target_epsilon`` (delta 1e-5) in exactly those steps (one record = one slice),
    then PSNR / SSIM / NMSE / SUVR bias per cohort on the held-out subjects, LD input first.

Keys: any config override (``train.batch_size=16 privacy.max_grad_norm=1.0 ...``), plus
``sites_dir=DIR``, ``regenerate=true``, ``eps=inf,10,3,1`` (the utility rows),
``methods=m2diff,unet``, ``m2diff_steps=100`` and ``unet_steps=300`` (training steps per
method), ``k4_eps=3`` (M2Diff rows with noise multiplicity 4 at these epsilons; default none),
``timing_steps=4`` (timed steps per repeat, after one warm-up step), ``timing_repeats=2``
(the best repeat is kept: the machine is shared), ``parts=timing,utility`` and
``threads=1`` (torch threads) and ``smoke=true`` (a toy budget for tests/test_benchmarks.py).
The default budget took about 13 minutes on 2 busy CPU cores (``k4_eps=3``: 7.5 more;
``methods=unet``: about 3); the tables are also written to ``<out>/privacy.md`` and
``privacy.json``, the per-subject rows to ``privacy_subjects.csv``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import DEFAULTS, sites, test_subjects  # noqa: E402
from quality import parse as split_words  # noqa: E402

from m2diff.config import compose, resolve_path  # noqa: E402

OWN = {"sites_dir": "data/benchmark-sim", "regenerate": "false", "eps": "inf,10,3,1",
       "methods": "m2diff,unet", "m2diff_steps": "100", "unet_steps": "300", "k4_eps": "",
       "timing_steps": "3", "timing_repeats": "3", "parts": "timing,utility", "smoke": "false",
       "threads": "1"}
SMOKE = {"eps": "inf,3", "m2diff_steps": "2", "unet_steps": "2", "k4_eps": "3",
         "timing_steps": "1", "timing_repeats": "1"}
SMOKE_OVERRIDES = ["generate.sites=1", "generate.subjects=3", "generate.shape=[32,32,8]",
                   "generate.angles=32", "generate.mlem_iters=4", "train.batch_size=4",
                   "sample.steps=2"]
GROUPS = {"m2diff": "tiny", "unet": "unet"}
DELTA = 1e-5
# Column keys double as headers (m2diff.report knows the metric ones).
TIME_COLUMNS = ("method", "per-sample grads", "K", "batch", "CPU s/step", "x no DP",
                "wall s/step")
UTIL_COLUMNS = ("method", "n", "psnr", "ssim", "nmse", "suvr_bias_pct", "σ", "ε spent", "steps",
                "train_s")


def parse(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Config overrides and this script's own keys (``smoke=true`` changes their defaults)."""
    overrides, own = list(DEFAULTS) + ["out=runs/benchmark-privacy"], dict(OWN)
    if any(w.lower() == "smoke=true" for w in argv):
        own.update(SMOKE)
        overrides += SMOKE_OVERRIDES
    return split_words(argv, overrides, own, tuple(OWN), "privacy.py")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _cfg(method: str, overrides: list[str], steps: int, eps: float | None, k: int = 1):
    """The config of one training: no DP when ``eps`` is None or inf."""
    dp = eps is not None and math.isfinite(eps)
    extra = [f"model={GROUPS[method]}", *overrides, f"train.steps={steps}"]
    if dp:
        # fl.rounds=1: target_epsilon is spent in exactly train.steps steps.
        extra += ["privacy=dp", f"privacy.target_epsilon={eps}", f"privacy.delta={DELTA}",
                  f"privacy.noise_multiplicity={k}", "privacy.budget_epsilon=null",
                  "fl.rounds=1"]
    return compose(extra)


def pooled_slices(cfg: Any, all_sites: list, stride: int):
    from m2diff.data.dataset import SliceSet, load_slices

    return SliceSet.concat([load_slices(s, "train", cfg.data, int(cfg.seed), stride)
                            for s in all_sites])


# --------------------------------------------------------------------------- (a) timing

def timing(overrides: list[str], own: dict[str, str], all_sites: list,
           device: torch.device) -> list[dict[str, Any]]:
    """Seconds per step on fixed batches: medians over ``timing_repeats`` round-robin turns."""
    from statistics import median

    from torch.utils.data import DataLoader

    from m2diff.model import build_model
    from m2diff.privacy import make_private
    from m2diff.train import make_optimizer, train_steps, training_dataset

    steps, repeats = int(own["timing_steps"]), int(own["timing_repeats"])
    # (method, per-sample gradients, K); None = no DP
    cases = [("m2diff", None, 1), ("m2diff", "Opacus hooks", 1), ("m2diff", "torch.func", 1),
             ("m2diff", "torch.func", 4), ("unet", None, 1), ("unet", "Opacus hooks", 1)]
    cases = [c for c in cases if c[0] in own["methods"].split(",")]
    trainers, rows = [], []
    for method, per_sample, k in cases:
        cfg = _cfg(method, overrides, steps, None if per_sample is None else 1.0, k)
        torch.manual_seed(int(cfg.seed))
        model = build_model(cfg.model).to(device)
        slices = pooled_slices(cfg, all_sites, int(model.stride))
        bs = int(cfg.train.batch_size)
        loader = DataLoader(training_dataset(slices), batch_size=bs, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        batches = [b for b, _ in zip(loader, range(steps + 1), strict=False)]
        optimizer = make_optimizer(model, cfg.train)
        if per_sample is not None:
            model, optimizer, _, _ = make_private(model, optimizer, slices, cfg, None,
                                                  functional=per_sample == "torch.func")
        trainers.append((model, optimizer, cfg, slices, batches))
        rows.append({"method": method, "per-sample grads": per_sample or "no DP", "K": k,
                     "batch": len(batches[0]["ld"]), "cpu": [], "wall": []})
    for model, optimizer, cfg, slices, batches in trainers:
        train_steps(model, slices, cfg, 1, optimizer=optimizer, device=device,
                    progress=False, loader=batches[:1], step_offset=0)  # warm-up
    for _ in range(repeats):  # round robin: every case sees the same machine load
        for row, (model, optimizer, cfg, slices, batches) in zip(rows, trainers, strict=True):
            cpu, wall = time.process_time(), time.perf_counter()
            train_steps(model, slices, cfg, steps, optimizer=optimizer, device=device,
                        progress=False, loader=batches[1:], step_offset=1)
            row["cpu"].append((time.process_time() - cpu) / steps)
            row["wall"].append((time.perf_counter() - wall) / steps)
            print(f"  timing {row['method']} {row['per-sample grads']} K={row['K']}: "
                  f"{row['cpu'][-1]:.3f} CPU s/step, {row['wall'][-1]:.3f} s/step wall",
                  flush=True)
    for row in rows:
        row["CPU s/step"], row["wall s/step"] = median(row["cpu"]), median(row["wall"])
    for row in rows:
        base = next(r for r in rows
                    if r["method"] == row["method"] and r["per-sample grads"] == "no DP")
        row["x no DP"] = row["CPU s/step"] / base["CPU s/step"]
    return rows


# --------------------------------------------------------------------------- (b) utility

def train_one(method: str, overrides: list[str], steps: int, eps: float, k: int,
              all_sites: list, device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """Train one row's model; returns (model for evaluation (EMA weights), cfg, info)."""
    from m2diff.model import build_model, unwrap_model
    from m2diff.privacy import epsilon, make_private
    from m2diff.train import make_optimizer, train_steps

    cfg = _cfg(method, overrides, steps, eps, k)
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model).to(device)
    slices = pooled_slices(cfg, all_sites, int(model.stride))
    optimizer = make_optimizer(model, cfg.train)
    info: dict[str, Any] = {"steps": steps, "σ": math.nan, "ε spent": math.inf}
    # The EMA weights (train.ema_decay) are evaluated, as in benchmarks/quality.py: with DP
    # they are post-processing of the privatised steps, free of privacy cost.
    if math.isfinite(eps):
        model, optimizer, loader, engine = make_private(
            model, optimizer, slices, cfg, None,
            generator=torch.Generator().manual_seed(int(cfg.seed)))
        result = train_steps(model, slices, cfg, steps, optimizer=optimizer, device=device,
                             progress=False, loader=loader, step_offset=0)
        info["σ"] = float(optimizer.noise_multiplier)
        info["ε spent"] = epsilon(engine, DELTA)
    else:
        result = train_steps(model, slices, cfg, steps, optimizer=optimizer, device=device,
                             progress=False, step_offset=0)
    info["train_s"] = float(result.seconds)
    info["slices"] = len(slices)
    trained = (result.ema.copy_to(build_model(cfg.model).to(device)) if result.ema is not None
               else unwrap_model(model))
    print(f"  {method} eps={eps:g} K={k}: {steps} steps on {len(slices)} slices, final loss "
          f"{result.loss:.4f}, sigma {info['σ']:.3g}, eps spent {info['ε spent']:.3g}, "
          f"{result.seconds:.0f} s", flush=True)
    return trained.eval(), cfg, info


def label(method: str, eps: float, k: int) -> str:
    name = "unet (regression)" if method == "unet" else method
    text = f"{name}, " + ("no DP" if not math.isfinite(eps) else f"ε={eps:g}")
    return text + (f", K={k}" if k > 1 else "")


def utility(overrides: list[str], own: dict[str, str], all_sites: list, cfg: Any,
            device: torch.device) -> tuple[dict[str, list[dict]], list[dict], dict[str, dict]]:
    from m2diff.evaluate import LD_METHOD, evaluate_subjects, summarise

    held_out = {s.name: test_subjects(cfg, s) for s in all_sites}
    rows: list[dict] = []
    for site in all_sites:
        rows += evaluate_subjects(None, cfg, site, held_out[site.name], device)
    runs = []
    methods = [m.strip() for m in own["methods"].split(",") if m.strip()]
    for method in methods:
        if method not in GROUPS:
            raise SystemExit(f"privacy.py: unknown method {method} (expected m2diff, unet)")
        steps = int(own[f"{method}_steps"])
        runs += [(method, steps, eps, 1) for eps in _floats(own["eps"])]
        if method == "m2diff":
            runs += [(method, steps, eps, 4) for eps in _floats(own["k4_eps"])]
    infos: dict[str, dict] = {}
    for method, steps, eps, k in runs:
        model, mcfg, info = train_one(method, overrides, steps, eps, k, all_sites, device)
        name = label(method, eps, k)
        infos[name] = info
        for site in all_sites:
            rows += [r for r in evaluate_subjects(model, mcfg, site, held_out[site.name], device,
                                                  name=name) if r["method"] != LD_METHOD]
    tables: dict[str, list[dict]] = {}
    for item in summarise(rows):
        if item["site"] == "pooled":
            row = {**item, **infos.get(item["method"], {})}
            tables.setdefault(item["cohort"], []).append(row)
    return tables, rows, infos


def main(argv: list[str]) -> int:
    from m2diff.enhance import run_device
    from m2diff.metrics import PROTOCOL
    from m2diff.report import markdown_table, print_table, write_csv, write_json

    overrides, own = parse(argv)
    torch.set_num_threads(int(own["threads"]))  # the machine is shared: times need a fixed pin
    cfg = compose(["model=tiny", *overrides])
    device = run_device(cfg)
    out = resolve_path(cfg.out)
    all_sites = sites(cfg, resolve_path(own["sites_dir"]), own["regenerate"].lower() == "true")
    parts = own["parts"].split(",")
    md = [f"Device: {device}, {torch.get_num_threads()} torch thread(s). "
          f"Batch {cfg.train.batch_size} (DP: Poisson-sampled, that many on average), "
          f"lr {cfg.train.lr}, max_grad_norm {compose(['privacy=dp']).privacy.max_grad_norm}, "
          f"delta {DELTA}.", ""]
    result: dict[str, Any] = {"overrides": overrides, "own": own}
    if "timing" in parts:
        rows = timing(overrides, own, all_sites, device)
        title = ("Time per training step (same fixed batches; medians of "
                 f"{own['timing_repeats']} turns x {own['timing_steps']} steps; ratio of CPU "
                 "times to the model's no-DP case)")
        print_table(rows, title, TIME_COLUMNS)
        md += [f"**{title}**", "", markdown_table(rows, TIME_COLUMNS), ""]
        result["timing"] = rows
    if "utility" in parts:
        tables, subject_rows, infos = utility(overrides, own, all_sites, cfg, device)
        md += [f"Protocol: {PROTOCOL}", ""]
        for cohort in ("CN", "AD", "all"):
            if cohort not in tables:
                continue
            title = (f"{cohort}: held-out subjects pooled over sites (mean ± std per subject); "
                     "σ = noise multiplier, ε spent at δ = 1e-5")
            print_table(tables[cohort], title, UTIL_COLUMNS)
            md += [f"**{title}**", "", markdown_table(tables[cohort], UTIL_COLUMNS), ""]
        result.update(tables=tables, runs=infos)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "privacy_subjects.csv", subject_rows)
    text = "\n".join(md)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy.md").write_text(text + "\n")
    write_json(out / "privacy.json", result)
    print(f"wrote {out / 'privacy.md'}, privacy.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
