"""``m2diff prepare src=EXPORT_DIR out=SITE_DIR [participants=FILE]``: the CLI edge.

One line per subject on stdout as it is done, one ``problem:`` line per problem on stderr
(the format of ``m2diff check``), then the check of the written site and where the QC
contact sheet is. Exit 0 when the site has usable subjects, 1 when it has none, 2 when
nothing could be done (no export, no spreadsheet, a foreign output folder).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from omegaconf import DictConfig, OmegaConf

from m2diff.config import ConfigError, resolve_path
from m2diff.data.check import summary_line
from m2diff.data.validate import validate_site
from m2diff.prepare.pipeline import CONTACT_SHEET, PrepareError, prepare_site
from m2diff.prepare.subject import Outcome


def _line(subject: str, outcome: Outcome | None, unchanged: bool) -> None:
    if outcome is None:
        return
    reg = outcome.registration or {}
    detail = ""
    if reg:
        shift = float(np.linalg.norm(reg.get("TranslationMm", [0, 0, 0])))
        detail = (f" (NMI {reg['NormalisedMutualInformation']:.3f}, rotation "
                  f"{reg['RotationDeg']:.1f} deg, shift {shift:.1f} mm, {reg['Seconds']:.1f} s)")
    if unchanged:
        state = "unchanged, kept" if outcome.ok else "unchanged, still left out"
    else:
        state = "prepared" if outcome.ok else "left out, see the problem below"
    print(f"{subject}: {state}{detail}", flush=True)


def run_prepare(cfg: DictConfig, args: dict[str, str]) -> int:
    """CLI entry; see the module docstring. ``data.require_sd`` / ``data.require_t1`` as in
    ``m2diff check`` (false: subjects without that volume are prepared without it)."""
    p = cfg.get("prepare")
    if p is None:
        raise ConfigError("the prepare settings (conf/prepare/default.yaml) are missing")
    src, out = resolve_path(p.get("src")), resolve_path(p.get("out"))
    if src is None or out is None:
        raise ConfigError("m2diff prepare needs src=EXPORT_DIR and out=SITE_DIR")
    participants = resolve_path(p.get("participants"))
    data = cfg.get("data", {})
    require_sd, require_t1 = bool(data.get("require_sd", True)), bool(data.get("require_t1", True))
    start = time.perf_counter()
    try:
        result = prepare_site(src, out, participants, OmegaConf.to_container(p, resolve=True),
                              require_sd, require_t1, report=_line)
    except PrepareError as exc:
        print(f"m2diff prepare: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"m2diff prepare: cannot write to {exc.filename or out}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}")
    for problem in result.problems:
        print(f"problem: {problem}", file=sys.stderr)
    site, check_problems = validate_site(out, require_sd=require_sd, require_t1=require_t1)
    for problem in check_problems:
        if result.usable:  # with nothing prepared, "no usable subjects" says it all
            print(f"problem: {problem} (m2diff check)", file=sys.stderr)
    print(f"prepared {len(result.prepared)}, unchanged {len(result.unchanged)}, "
          f"failed {len(result.failed)} in {time.perf_counter() - start:.1f} s; "
          f"QC contact sheet: {out / CONTACT_SHEET}")
    print(summary_line(site, check_problems))
    if not site.subjects:
        print(f"m2diff prepare: no usable subjects at {site.name}", file=sys.stderr)
        return 1
    return 0
