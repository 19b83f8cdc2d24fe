"""Sampling benchmark: DDPM (full schedule) vs DDIM 10/25/50/100 steps on one volume.

    .venv/bin/python benchmarks/sampling.py [checkpoint=CKPT.pt] [key=value ...]

Enhances one held-out volume (the first test subject of the first site) with each sampler and
prints wall time and PSNR / SSIM against the SD image (brain mask, data range from SD). Times
are also given as ratios to the DDPM time measured in the same run. Without ``checkpoint=`` a
tiny M2Diff is trained briefly (``train.steps``, default 300) on the simulated sites of
benchmarks/quality.py (``sites_dir=``, generated if missing).
Keys: config overrides, ``checkpoint=``, ``sites_dir=``, ``ddim=10,25,50,100``, ``ddpm=true``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import DEFAULTS, sites, test_subjects, train_method  # noqa: E402

from m2diff.config import compose, resolve_path  # noqa: E402

OWN_KEYS = ("checkpoint", "sites_dir", "ddim", "ddpm")


def main(argv: list[str]) -> int:
    from m2diff.data.mask import brain_mask
    from m2diff.data.nifti import load_volume
    from m2diff.enhance import enhance_volume, load_for_inference, run_device
    from m2diff.metrics import psnr, ssim
    from m2diff.report import print_table

    overrides, own = list(DEFAULTS), {}
    for word in argv:
        key, sep, value = word.partition("=")
        if not sep:
            raise SystemExit(f"sampling.py: '{word}' is not key=value")
        (own.__setitem__(key, value) if key in OWN_KEYS else overrides.append(word))
    cfg = compose(["model=tiny", *overrides])
    device = run_device(cfg)
    all_sites = sites(cfg, resolve_path(own.get("sites_dir", "data/benchmark-sim")), False)
    site = next(s for s in all_sites if test_subjects(cfg, s))
    subject = test_subjects(cfg, site)[0]
    if own.get("checkpoint"):
        model, cfg = load_for_inference(cfg, own["checkpoint"], device)
    else:
        model, cfg, _ = train_method("m2diff", overrides, all_sites, device)
    if not getattr(model, "is_diffusion", False):
        raise SystemExit("sampling.py: the model is not a diffusion model")

    ld = load_volume(subject.ld)
    sd = load_volume(subject.sd).data
    t1 = load_volume(subject.t1).data if subject.t1 else None
    mask = brain_mask(sd)
    runs = [("ddpm", int(cfg.model.num_train_timesteps))] if own.get("ddpm", "true") == "true" else []
    runs += [("ddim", int(n)) for n in own.get("ddim", "10,25,50,100").split(",") if n]
    print(f"{site.name}/{subject.id} ({subject.diagnosis}), {ld.data.shape} voxels, {device}",
          flush=True)
    rows = [{"method": "LD input", "psnr": psnr(ld.data, sd, mask), "ssim": ssim(ld.data, sd, mask)}]
    for sampler, steps in runs:
        cfg.sample.sampler, cfg.sample.steps, cfg.sample.samples = sampler, steps, 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pred, _ = enhance_volume(model, cfg, ld.data, t1, device, seed=int(cfg.seed))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"method": f"{sampler.upper()} {steps}", "seconds": seconds,
                     "psnr": psnr(pred, sd, mask), "ssim": ssim(pred, sd, mask)})
        print(f"  {rows[-1]['method']}: {seconds:.1f} s, PSNR {rows[-1]['psnr']:.2f}", flush=True)
    ddpm = next((r["seconds"] for r in rows if r["method"].startswith("DDPM")), None)
    for row in rows[1:]:
        row["time_ratio"] = row["seconds"] / ddpm if ddpm else float("nan")
    print_table(rows, f"Sampling one volume ({cfg.model.arch}; time ratio to DDPM "
                      f"{cfg.model.num_train_timesteps} steps in this run)",
                ["method", "seconds", "time_ratio", "psnr", "ssim"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
