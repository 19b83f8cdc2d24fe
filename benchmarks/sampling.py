"""Sampling benchmark: PSNR and time per volume for DDIM 1, 2, 4, 8, 25 steps and DDPM (every
timestep of the schedule) with the default model.

    .venv/bin/python benchmarks/sampling.py [checkpoint=CKPT.pt] [key=value ...]

Enhances held-out volumes of benchmarks/quality.py's simulated sites (``subjects`` per site,
default 1: one volume of each dose) with each sampler, starting where the formulation starts
(``sample.start``), and prints the wall time per volume, its ratio to the DDPM time of the
same run, and PSNR / SSIM against the SD image (brain mask, data range from SD) averaged over
the volumes. The fewest DDIM steps within 0.2 dB of the best PSNR are printed as the
recommended ``sample.steps`` (the product default, conf/config.yaml, comes from this run).
Without ``checkpoint=`` the default M2Diff is trained as in benchmarks/quality.py
(``train.steps``, default 300) on its sites (``sites_dir=``, generated if missing).
Keys: config overrides, ``checkpoint=``, ``sites_dir=``, ``ddim=1,2,4,8,25``, ``ddpm=true``,
``subjects=1`` (held-out volumes per site), ``threads=1`` (torch threads).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import DEFAULTS, parse, sites, test_subjects, train_method  # noqa: E402

from m2diff.config import compose, resolve_path  # noqa: E402

OWN_KEYS = ("checkpoint", "sites_dir", "ddim", "ddpm", "subjects", "threads")
WITHIN_DB = 0.2


def recommended_steps(rows: list[dict], within: float = WITHIN_DB) -> int | None:
    """The fewest DDIM steps whose PSNR is within ``within`` dB of the best sampler's."""
    runs = [r for r in rows if r.get("sampler") in ("DDIM", "DDPM")]
    if not runs:
        return None
    best = max(r["psnr"] for r in runs)
    ok = [r["steps"] for r in runs if r["sampler"] == "DDIM" and r["psnr"] >= best - within]
    return min(ok) if ok else None


def main(argv: list[str]) -> int:
    from m2diff.data.mask import brain_mask
    from m2diff.data.nifti import load_volume
    from m2diff.enhance import enhance_volume, load_for_inference, run_device, voxel_size
    from m2diff.metrics import psnr, ssim
    from m2diff.model.diffusion import formulation, start_timestep
    from m2diff.report import markdown_table, print_table, write_json

    overrides, own = parse(argv, list(DEFAULTS) + ["out=runs/benchmark-sampling"],
                           own_keys=OWN_KEYS, script="sampling.py")
    torch.set_num_threads(int(own.get("threads", 1)))  # see quality.py
    cfg = compose(["model=tiny", *overrides])
    device = run_device(cfg)
    all_sites = sites(cfg, resolve_path(own.get("sites_dir", "data/benchmark-sim")), False)
    per_site = int(own.get("subjects", 1))
    volumes = [(site, subject) for site in all_sites for subject in test_subjects(cfg, site)[:per_site]]
    if own.get("checkpoint"):
        model, cfg = load_for_inference(cfg, own["checkpoint"], device)
    else:
        model, cfg, _ = train_method("m2diff", overrides, all_sites, device)
    if not getattr(model, "is_diffusion", False):
        raise SystemExit("sampling.py: the model is not a diffusion model")
    form = formulation(cfg.model)
    start = form.start if str(cfg.sample.get("start", "auto")) == "auto" else str(cfg.sample.start)
    t0 = start_timestep(cfg.sample, int(cfg.model.num_train_timesteps), start)

    data = []
    for site, subject in volumes:
        ld = load_volume(subject.ld)
        sd = load_volume(subject.sd).data
        t1 = load_volume(subject.t1).data if subject.t1 else None
        data.append((ld.data, t1, sd, brain_mask(sd), voxel_size(ld.affine)))
        print(f"{site.name}/{subject.id} ({subject.diagnosis}), {ld.data.shape} voxels", flush=True)
    runs = [("ddpm", t0 + 1)] if own.get("ddpm", "true") == "true" else []
    runs += [("ddim", int(n)) for n in own.get("ddim", "1,2,4,8,25").split(",") if n]
    rows = [{"sampler": "LD input", "steps": 0,
             "psnr": float(np.mean([psnr(ld, sd, m) for ld, _, sd, m, _ in data])),
             "ssim": float(np.mean([ssim(ld, sd, m) for ld, _, sd, m, _ in data]))}]
    for sampler, steps in runs:
        cfg.sample.sampler, cfg.sample.steps, cfg.sample.samples = sampler, steps, 1
        scores, seconds = [], []
        for ld, t1, sd, mask, voxel in data:
            if device.type == "cuda":
                torch.cuda.synchronize()
            begin = time.perf_counter()
            pred, _ = enhance_volume(model, cfg, ld, t1, device, seed=int(cfg.seed), voxel_mm=voxel)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - begin)
            scores.append((psnr(pred, sd, mask), ssim(pred, sd, mask)))
        rows.append({"sampler": sampler.upper(), "steps": steps,
                     "seconds": float(np.mean(seconds)),
                     "psnr": float(np.mean([s[0] for s in scores])),
                     "ssim": float(np.mean([s[1] for s in scores]))})
        print(f"  {sampler.upper()} {steps}: {rows[-1]['seconds']:.2f} s/volume, "
              f"PSNR {rows[-1]['psnr']:.2f}", flush=True)
    ddpm = next((r["seconds"] for r in rows if r["sampler"] == "DDPM"), None)
    for row in rows[1:]:
        row["time_ratio"] = row["seconds"] / ddpm if ddpm else float("nan")
    columns = ["sampler", "steps", "seconds", "time_ratio", "psnr", "ssim"]
    title = (f"Sampling {len(data)} held-out volume(s) ({cfg.model.arch}, formulation "
             f"{form.name}: {form.prediction} prediction of {form.target}, start {start} at "
             f"t = {t0}; seconds per volume, time ratio to DDPM {t0 + 1} steps in this run)")
    print_table(rows, title, columns)
    best = recommended_steps(rows)
    line = (f"fewest DDIM steps within {WITHIN_DB} dB of the best PSNR: {best}"
            if best is not None else "no DDIM run")
    print(line)
    out = resolve_path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    text = f"**{title}**\n\n{markdown_table(rows, columns)}\n\n{line}\n"
    (out / "sampling.md").write_text(text)
    write_json(out / "sampling.json", {"rows": rows, "recommended_steps": best, "title": title})
    print(f"wrote {out / 'sampling.md'}, sampling.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
