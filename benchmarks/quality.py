"""Quality benchmark: the LD input vs UNet regression vs single-pathway DDPM vs M2Diff (the
product's formulation, the paper's, MRI-free), per site and cohort.

    .venv/bin/python benchmarks/quality.py [key=value ...]

Generates (or reuses) simulated sites (3 sites x 24 subjects of 48 x 48 x 16: healthy-only at
1/4 dose, AD-heavy at 1/20, mixed at 1/100), holds out 4 subjects of every site and cohort
(a ``split`` column in participants.tsv: 20 test subjects, 52 train), trains every method on
the same training subjects of all sites for the same budget (``train.steps``, the product's
learning rate, batch and EMA unless overridden), evaluates them on the held-out subjects and
prints

- per site and cohort: PSNR, SSIM and the SUVR bias of the AD regions, every method beside
  the LD input (what "never worse than its input" is judged on);
- per cohort, pooled over sites: PSNR, SSIM, NMSE, SUVR bias, train and sampling time;
- the SUVR bias per AD region (parietal, posterior cingulate, precuneus, temporal) per cohort;
- the goals of the product checked line by line (default M2Diff >= LD input in PSNR and
  SSIM in every site x cohort, above unet pooled, AD |SUVR bias| <= 2 % and no worse than LD).

The tables are also written as markdown (``<out>/quality.md``, for the README) with the
per-subject CSV/JSON, and every trained model as ``<out>/<method>.pt`` (EMA weights; e.g.
``benchmarks/sampling.py checkpoint=runs/benchmark-quality/m2diff.pt``).

Methods (``methods=a,b,...``; default ``unet,m2diff,m2diff_no_lowpass,m2diff_paper,
ddpm_concat,m2diff_mri_free``): ``unet`` (regression), ``m2diff`` (model=tiny, the default
formulation and sampler), ``m2diff_no_lowpass`` (the m2diff weights without the LD low-pass,
``sample.ld_lowpass_fwhm_mm=0``), ``m2diff_paper`` (the paper's formulation: noise prediction
of SD, sampled from pure noise, DDIM 25 steps, no low-pass), ``ddpm_concat`` (single pathway,
default formulation and sampler), ``m2diff_mri_free`` (the m2diff weights sampled without
MRI: no extra training), and for measurements
``m2diff_v`` (v prediction), ``m2diff_x0_sd`` (x0 prediction of SD), ``m2diff_noise_cond``
(+ the LD noise level embedded), ``ddpm_concat_paper``.

Keys: any config override (``train.steps=2000 model.channels=[64,128,128] device=cuda
generate.subjects=24 generate.shape=[128,128,48]``), plus ``sites_dir=DIR`` (simulated sites;
reused when generated with the same settings), ``methods=...``, ``regenerate=true``,
``test_per_group=4`` (held-out subjects per site and cohort) and ``threads=1`` (torch threads). The default budget (300
steps per model) took about 25 minutes on 2 CPU cores shared with other jobs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m2diff.config import ConfigError, compose, resolve_path  # noqa: E402
from m2diff.data.layout import Site  # noqa: E402
from m2diff.ops.words import parse_words  # noqa: E402

# CPU defaults; every one of them can be overridden on the command line. Learning rate, EMA
# and sampler are the product's defaults (conf/).
DEFAULTS = [
    "generate.sites=3", "generate.subjects=24", "generate.shape=[48,48,16]",
    "generate.angles=64", "generate.mlem_iters=15",
    "train.steps=300", "train.batch_size=16", "out=runs/benchmark-quality",
]
TEST_PER_GROUP = 4  # held-out subjects per site and cohort
DEFAULT_METHODS = "unet,m2diff,m2diff_no_lowpass,m2diff_paper,ddpm_concat,m2diff_mri_free"


@dataclass(frozen=True)
class Method:
    """A row of the benchmark: the model config group and overrides it trains with,
    overrides for evaluation only, or the method whose trained weights it reuses."""

    group: str
    train: list[str] = field(default_factory=list)
    sample: list[str] = field(default_factory=list)
    reuse: str | None = None


# The paper samples with DDPM 1000 (DDIM 25 here) and has no LD low-pass.
PAPER_SAMPLING = ["sample.steps=25", "sample.ld_lowpass_fwhm_mm=0"]
METHODS: dict[str, Method] = {
    "unet": Method("unet"),
    "m2diff": Method("tiny"),
    "m2diff_paper": Method("tiny", ["model.formulation=paper"], PAPER_SAMPLING),
    "ddpm_concat": Method("ddpm_concat"),
    "m2diff_mri_free": Method("tiny", sample=["sample.mri=false"], reuse="m2diff"),
    "m2diff_no_lowpass": Method("tiny", sample=["sample.ld_lowpass_fwhm_mm=0"], reuse="m2diff"),
    "m2diff_v": Method("tiny", ["model.prediction=v"]),
    "m2diff_x0_sd": Method("tiny", ["model.target=sd"]),
    "m2diff_noise_cond": Method("tiny", ["model.noise_cond=true"]),
    "ddpm_concat_paper": Method("ddpm_concat", ["model.formulation=paper"], PAPER_SAMPLING),
}
SITE_COLUMNS = ("site", "cohort", "method", "n", "psnr", "ssim", "suvr_bias_pct")
COLUMNS = ("method", "n", "psnr", "ssim", "nmse", "suvr_bias_pct", "train_s", "sample_s")
REGION_COLUMNS = ("cohort", "method", "n", "AD regions %", "parietal %", "posterior cingulate %",
                  "precuneus %", "temporal %")
OWN_KEYS = ("sites_dir", "methods", "regenerate", "test_per_group", "threads")
GOAL_METHOD, BASELINE = "m2diff", "unet"
AD_BIAS_GOAL = 2.0  # percent


def parse(argv: list[str], overrides: list[str] | None = None, own: dict[str, str] | None = None,
          own_keys: tuple[str, ...] | None = None, script: str = "quality.py"
          ) -> tuple[list[str], dict[str, str]]:
    """Split ``key=value`` words into config overrides (after ``overrides``, default
    ``DEFAULTS``) and the script's own keys (``own_keys``, starting from ``own``)."""
    overrides = list(DEFAULTS if overrides is None else overrides)
    own = dict(own or {})
    keys = OWN_KEYS if own_keys is None else own_keys
    try:
        args, rest = parse_words(argv, keys, dashes=False)
    except ConfigError as exc:
        raise SystemExit(f"{script}: {exc}") from None
    own.update(args)
    return overrides + rest, own


def assign_splits(root: Path, per_group: int, seed: int) -> None:
    """Write a split column into ``root``'s participants.tsv: in every cohort, the
    ``per_group`` subjects first by a seeded hash of their id are "test", the rest "train"
    (a cohort keeps at least one subject for training)."""
    from m2diff.data.layout import PARTICIPANTS, write_participants

    with open(root / PARTICIPANTS, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    for cohort in ("CN", "AD"):
        ids = sorted((r["participant_id"] for r in rows if r["diagnosis"] == cohort),
                     key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        test = set(ids[:min(per_group, max(0, len(ids) - 1))])
        for r in rows:
            if r["diagnosis"] == cohort:
                r["split"] = "test" if r["participant_id"] in test else "train"
    write_participants(root, rows)


def sites(cfg: Any, sites_dir: Path, regenerate: bool, per_group: int = TEST_PER_GROUP) -> list[Site]:
    """Generate the simulated sites into ``sites_dir`` unless the same settings are there;
    ``per_group`` subjects per site and cohort are held out (``assign_splits``)."""
    from m2diff.data.validate import validate_site

    stamp = sites_dir / "generate.json"
    wanted = {"generate": OmegaConf.to_container(cfg.generate, resolve=True), "seed": int(cfg.seed),
              "test_per_group": int(per_group)}
    if regenerate or not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        from m2diff.data.generate.cohort import generate_sites

        if sites_dir.exists():
            shutil.rmtree(sites_dir)
        start = time.perf_counter()
        print(f"generating {cfg.generate.sites} sites x {cfg.generate.subjects} subjects "
              f"{list(cfg.generate.shape)} into {sites_dir} ...", flush=True)
        for root in generate_sites(cfg.generate, sites_dir, seed=int(cfg.seed), progress=True):
            assign_splits(root, int(per_group), int(cfg.seed))
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
    """Build and train one method on the train split of every site; returns
    (model (EMA weights if any), cfg, train seconds)."""
    from m2diff.data.dataset import SliceSet, load_slices
    from m2diff.model import build_model
    from m2diff.train import train_steps

    spec = METHODS[method]
    cfg = compose([f"model={spec.group}", *overrides, *spec.train, *spec.sample])
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model).to(device)
    slices = SliceSet.concat([load_slices(s, "train", cfg.data, int(cfg.seed), model.stride)
                              for s in all_sites])
    print(f"training {method}: {len(slices)} slices, {cfg.train.steps} steps, lr {cfg.train.lr} "
          f"on {device} ...", flush=True)
    result = train_steps(model, slices, cfg, int(cfg.train.steps), device=device, progress=True)
    print(f"  {method}: final loss {result.loss:.4f}, {result.seconds:.0f} s", flush=True)
    # Evaluate what a checkpoint would hold: the EMA weights when train.ema_decay > 0.
    trained = result.ema.copy_to(model) if result.ema is not None else model
    return trained.eval(), cfg, float(result.seconds)


def test_subjects(cfg: Any, site: Site) -> list:
    from m2diff.data.splits import split_subjects

    return split_subjects(site.subjects, list(cfg.data.split), int(cfg.seed))["test"]


def site_table(summary: list[dict]) -> list[dict]:
    """Rows per site x cohort (CN, AD; sites in order), LD input first."""
    out = [dict(item) for cohort in ("CN", "AD") for item in summary
           if item["cohort"] == cohort and item["site"] != "pooled"]
    for row in out:
        for key in ("psnr", "ssim", "suvr_bias_pct"):
            row[f"{key}_std"] = float("nan")  # the site table shows means only
    return out


def cohort_tables(summary: list[dict], timings: dict[str, float]) -> dict[str, list[dict]]:
    """Per cohort: one row per method (LD input first), pooled over sites."""
    from m2diff.evaluate import LD_METHOD

    tables: dict[str, list[dict]] = {}
    for item in summary:
        if item["site"] != "pooled":
            continue
        row = dict(item)
        row["train_s"] = timings.get(item["method"], float("nan")) if item["method"] != LD_METHOD else float("nan")
        row["sample_s"] = item.get("seconds", float("nan"))
        row["sample_s_std"] = float("nan")
        tables.setdefault(item["cohort"], []).append(row)
    return tables


def region_table(summary: list[dict]) -> list[dict]:
    """SUVR bias (%) per AD region, per cohort, pooled over sites."""
    from m2diff.regions import AD_REGIONS

    out = []
    for item in summary:
        if item["site"] != "pooled" or item["cohort"] == "all":
            continue
        row = {"cohort": item["cohort"], "method": item["method"], "n": item["n"],
               "AD regions %": f"{item['suvr_bias_pct']:+.2f}"}
        for region in AD_REGIONS:
            value = item.get(f"suvr_bias_{region.name}", float("nan"))
            row[f"{region.name.replace('_', ' ')} %"] = f"{value:+.2f}"
        out.append(row)
    return out


def goals(summary: list[dict], method: str = GOAL_METHOD, baseline: str = BASELINE) -> list[str]:
    """The product's goals, one line each, checked on the summary (methods present only)."""
    from m2diff.evaluate import LD_METHOD

    def get(site: str, cohort: str, name: str) -> dict | None:
        return next((s for s in summary if s["site"] == site and s["cohort"] == cohort
                     and s["method"] == name), None)

    if not any(s["method"] == method for s in summary):
        return []
    lines = []
    groups = [(s["site"], s["cohort"]) for s in summary if s["method"] == LD_METHOD
              and s["cohort"] != "all" and s["site"] != "pooled"]
    for site, cohort in groups:
        m, ld = get(site, cohort, method), get(site, cohort, LD_METHOD)
        if m is None or ld is None:
            continue
        ok = m["psnr"] >= ld["psnr"] and m["ssim"] >= ld["ssim"]
        lines.append(f"{'met ' if ok else 'MISS'} {method} >= LD input, {site} {cohort} (n={m['n']}): "
                     f"PSNR {m['psnr']:.2f} vs {ld['psnr']:.2f} dB ({m['psnr'] - ld['psnr']:+.2f}), "
                     f"SSIM {m['ssim']:.4f} vs {ld['ssim']:.4f}")
    m, b = get("pooled", "all", method), get("pooled", "all", baseline)
    if m is not None and b is not None:
        ok = m["psnr"] > b["psnr"] and m["ssim"] > b["ssim"]
        lines.append(f"{'met ' if ok else 'MISS'} {method} above {baseline}, pooled: PSNR {m['psnr']:.2f} "
                     f"vs {b['psnr']:.2f} dB, SSIM {m['ssim']:.4f} vs {b['ssim']:.4f}")
    for site in [s for s, c in groups if c == "AD"] + ["pooled"]:
        m, ld = get(site, "AD", method), get(site, "AD", LD_METHOD)
        if m is None or ld is None:
            continue
        bias, ld_bias = m["suvr_bias_pct"], ld["suvr_bias_pct"]
        within = abs(bias) <= AD_BIAS_GOAL
        no_worse = abs(bias) <= abs(ld_bias)
        lines.append(f"{'met ' if within and no_worse else 'MISS'} AD-region SUVR bias, {site} AD: "
                     f"{bias:+.2f} % (|bias| <= {AD_BIAS_GOAL:g} %: {'yes' if within else 'no'}; "
                     f"LD input {ld_bias:+.2f} %, no worse: {'yes' if no_worse else 'no'})")
    return lines


def main(argv: list[str]) -> int:
    from m2diff.checkpoint import save_checkpoint
    from m2diff.enhance import run_device
    from m2diff.evaluate import LD_METHOD, evaluate_subjects, summarise
    from m2diff.metrics import PROTOCOL
    from m2diff.report import markdown_table, print_table, write_csv, write_json

    overrides, own = parse(argv)
    # One torch thread by default: on a shared CPU two OpenMP threads spin against the other
    # processes and make the tiny models' small ops several times slower.
    torch.set_num_threads(int(own.get("threads", 1)))
    cfg = compose(["model=tiny", *overrides])
    device = run_device(cfg)
    out = resolve_path(cfg.out)
    sites_dir = resolve_path(own.get("sites_dir", "data/benchmark-sim"))
    per_group = int(own.get("test_per_group", TEST_PER_GROUP))
    all_sites = sites(cfg, sites_dir, own.get("regenerate", "false").lower() == "true", per_group)
    held_out = {s.name: test_subjects(cfg, s) for s in all_sites}
    print("held-out subjects: " + ", ".join(
        f"{k} {sum(s.diagnosis == 'CN' for s in v)} CN + {sum(s.diagnosis == 'AD' for s in v)} AD"
        for k, v in held_out.items()))

    rows: list[dict] = []
    for site in all_sites:  # the LD input row: no training
        rows += evaluate_subjects(None, cfg, site, held_out[site.name], device)
    timings: dict[str, float] = {}
    trained: dict[str, tuple[Any, Any]] = {}
    methods = [m.strip() for m in own.get("methods", DEFAULT_METHODS).split(",") if m.strip()]
    for method in methods:
        if method not in METHODS:
            raise SystemExit(f"quality.py: unknown method {method} (expected {', '.join(METHODS)})")
    start_all = time.perf_counter()
    for method in methods:
        spec = METHODS[method]
        if spec.reuse is not None:
            if spec.reuse not in trained:
                trained[spec.reuse] = train_method(spec.reuse, overrides, all_sites, device)[:2]
            model, base_cfg = trained[spec.reuse]
            mcfg = compose([f"model={spec.group}", *overrides, *METHODS[spec.reuse].train,
                            *spec.sample])
            mcfg.model = base_cfg.model
        else:
            model, mcfg, timings[method] = train_method(method, overrides, all_sites, device)
            trained[method] = (model, mcfg)
            save_checkpoint(out / f"{method}.pt", model, mcfg, steps=int(mcfg.train.steps))
        start = time.perf_counter()
        for site in all_sites:
            rows += [r for r in evaluate_subjects(model, mcfg, site, held_out[site.name], device,
                                                  name=method) if r["method"] != LD_METHOD]
        print(f"  {method}: evaluated in {time.perf_counter() - start:.0f} s", flush=True)

    summary = summarise(rows)
    tables = cohort_tables(summary, timings)
    budget = (f"train.steps={cfg.train.steps}, batch {cfg.train.batch_size}, lr {cfg.train.lr}, "
              f"EMA {cfg.train.ema_decay}; sampling {cfg.sample.sampler} {cfg.sample.steps} "
              f"step(s) (m2diff_paper: 25); device {device}; {len(all_sites)} sites x "
              f"{cfg.generate.subjects} subjects {list(cfg.generate.shape)}, {per_group} held out "
              f"per site and cohort; wall {time.perf_counter() - start_all:.0f} s")
    md = [f"Protocol: {PROTOCOL}", "", f"Budget: {budget}.", ""]
    title = "Per site and cohort: held-out subjects (mean per subject; SUVR bias of the AD regions)"
    print_table(site_table(summary), title, SITE_COLUMNS)
    md += [f"**{title}**", "", markdown_table(site_table(summary), SITE_COLUMNS), ""]
    for cohort in ("CN", "AD", "all"):
        if cohort not in tables:
            continue
        title = f"{cohort}: held-out subjects pooled over sites (mean ± std per subject)"
        print_table(tables[cohort], title, COLUMNS)
        md += [f"**{title}**", "", markdown_table(tables[cohort], COLUMNS), ""]
    title = "SUVR bias per AD region (against the cerebellum), pooled over sites"
    print_table(region_table(summary), title, REGION_COLUMNS)
    md += [f"**{title}**", "", markdown_table(region_table(summary), REGION_COLUMNS), ""]
    lines = goals(summary)
    if lines:
        print("\nGoals (default M2Diff):\n" + "\n".join(lines))
        md += ["Goals (default M2Diff):", "", *[f"- {line}" for line in lines], ""]
    text = "\n".join(md)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(text + "\n")
    write_csv(out / "quality_subjects.csv", rows)
    write_json(out / "quality.json", {"protocol": PROTOCOL, "budget": budget, "subjects": rows,
                                      "summary": summary, "tables": tables, "goals": lines,
                                      "overrides": overrides})
    print(f"wrote {out / 'quality.md'}, quality_subjects.csv, quality.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
