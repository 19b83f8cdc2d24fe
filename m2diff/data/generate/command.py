"""``m2diff generate``: write simulated multi-site cohorts (see cohort.generate_sites)."""

from __future__ import annotations

import sys
import time

from omegaconf import DictConfig

from m2diff.config import resolve_path


def run_generate(cfg: DictConfig, args: dict[str, str]) -> int:
    """Generate ``cfg.generate.sites`` site folders under ``cfg.generate.out`` with ``cfg.seed``.

    Returns 0, or 2 with one line on stderr when the output folder cannot be written.
    Bad settings raise ConfigError, which the CLI prints as one line.
    """
    from m2diff.data.generate.cohort import generate_sites

    out = resolve_path(cfg.generate.get("out"))
    if out is None:
        print("m2diff generate: out=DIR is required", file=sys.stderr)
        return 2
    start = time.perf_counter()
    raw = cfg.get("export", {}).get("format", "site") == "raw"
    try:
        if raw:
            from m2diff.data.generate.export_raw import generate_exports

            sites = generate_exports(cfg.generate, cfg.export, out, seed=cfg.get("seed", 0),
                                     progress=sys.stderr.isatty() or sys.stdout.isatty())
        else:
            sites = generate_sites(cfg.generate, out, seed=cfg.get("seed", 0),
                                   progress=sys.stderr.isatty() or sys.stdout.isatty())
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = exc.filename or out
        print(f"m2diff generate: cannot write to {where}: {reason}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    from m2diff.data.generate.settings import read_settings

    n = sum(p.subjects for p in read_settings(cfg.generate).site_profiles)
    what = "raw export(s)" if raw else "site(s)"
    print(f"wrote {len(sites)} {what}, {n} subjects, to {out} in {seconds:.1f} s: "
          + ", ".join(s.name for s in sites))
    return 0
