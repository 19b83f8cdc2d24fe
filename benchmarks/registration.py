"""Registration benchmark: how well and how fast ``m2diff prepare`` finds the T1's pose.

    .venv/bin/python benchmarks/registration.py [export=raw] [sites=3] [subjects=2] [seed=0]
        [export_dir=data/benchmark-raw] [key=value ...]

Generates raw exports (``m2diff generate export=raw``: PET on its own 2.6 x 2.6 x 2.9 mm
grid, a 1 mm sagittal T1 in a random pose, rotation up to 10 degrees and shift up to 10 mm;
every other subject as DICOM series) unless the same settings are already in
``export_dir``, prepares every site into a fresh folder, and prints one row per subject:
the true pose, the error of the found one (mean and max displacement over the PET's brain
voxels, mm; residual rotation, degrees), the quality number (NMI) and the time per subject
(wall and CPU seconds of this process, which prepares one subject at a time). Other
keys are config overrides (e.g. ``prepare.registration.sampling=0.1``).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m2diff.config import ConfigError, compose, resolve_path  # noqa: E402
from m2diff.ops.words import parse_words  # noqa: E402

OWN_KEYS = ("export_dir", "sites", "subjects", "seed")
COLUMNS = ["site", "subject", "format", "dose", "true_rot_deg", "true_shift_mm", "err_mean_mm",
           "err_max_mm", "err_deg", "nmi", "wall_s", "cpu_s"]


def exports(cfg, folder: Path) -> list[Path]:
    """The raw export folders for ``cfg`` (generated unless ``folder`` already has them)."""
    from omegaconf import OmegaConf

    from m2diff.data.generate.export_raw import generate_exports

    stamp = folder / "export.json"
    wanted = {"generate": OmegaConf.to_container(cfg.generate, resolve=True),
              "export": OmegaConf.to_container(cfg.export, resolve=True), "seed": int(cfg.seed)}
    if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        if folder.exists():
            shutil.rmtree(folder)
        generate_exports(cfg.generate, cfg.export, folder, seed=int(cfg.seed), progress=True)
        stamp.write_text(json.dumps(wanted))
    return sorted(p for p in folder.iterdir() if (p / "participants.csv").is_file())


def main(argv: list[str]) -> int:
    import nibabel as nib
    from omegaconf import OmegaConf

    from m2diff.data.layout import ld_path
    from m2diff.prepare.geometry import rigid_error, rotation_deg
    from m2diff.prepare.pipeline import STATE, prepare_site
    from m2diff.prepare.register import pet_brain
    from m2diff.report import markdown_table, print_table

    own = {"sites": "3", "subjects": "2", "seed": "0", "export_dir": "data/benchmark-raw"}
    overrides = ["export=raw"]
    try:
        args, rest = parse_words(argv, OWN_KEYS, dashes=False)
    except ConfigError as exc:
        raise SystemExit(f"registration.py: {exc}") from None
    own.update(args)
    overrides += rest
    cfg = compose([*overrides, f"generate.sites={own['sites']}",
                   f"generate.subjects={own['subjects']}", f"seed={own['seed']}"])
    if cfg.export.get("format") != "raw":
        raise SystemExit("registration.py: needs a raw export (export=raw or export=raw_tiny)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for export in exports(cfg, resolve_path(own["export_dir"])):
            truth = json.loads((export.parent / "truth" / f"{export.name}.json").read_text())
            out = Path(tmp) / export.name
            clock = {"wall": time.perf_counter(), "cpu": time.process_time()}
            spent: dict[str, tuple[float, float]] = {}

            def lap(sid, outcome, unchanged, clock=clock, spent=spent):
                wall, cpu = time.perf_counter(), time.process_time()
                spent[sid] = (wall - clock["wall"], cpu - clock["cpu"])
                clock.update(wall=wall, cpu=cpu)

            result = prepare_site(export, out, None, OmegaConf.to_container(cfg.prepare), report=lap)
            for sid, info in truth.items():
                true = np.asarray(info["pet_to_t1_ras"])
                row = {"site": export.name, "subject": sid, "format": info["format"],
                       "dose": info["dose"], "true_rot_deg": rotation_deg(true),
                       "true_shift_mm": float(np.linalg.norm(true[:3, 3])),
                       "wall_s": spent.get(sid, (np.nan,))[0], "cpu_s": spent.get(sid, (0, np.nan))[1]}
                record = json.loads((out / STATE / f"{sid}.json").read_text())
                reg = record.get("registration")
                if reg is None or sid not in result.usable:
                    row["nmi"] = reg["NormalisedMutualInformation"] if reg else np.nan
                    rows.append(row | {"err_mean_mm": np.nan, "err_max_mm": np.nan, "err_deg": np.nan})
                    continue
                found = np.asarray(reg["PETToT1TransformRAS"])
                pet = nib.load(str(ld_path(out, sid)))
                brain = pet_brain(np.asarray(pet.dataobj), pet.header.get_zooms()[:3])
                points = nib.affines.apply_affine(pet.affine, np.argwhere(brain))
                mean_mm, deg = rigid_error(found, true, points)
                moved = nib.affines.apply_affine(np.linalg.inv(true) @ found, points)
                rows.append(row | {"err_mean_mm": mean_mm, "err_deg": deg,
                                   "err_max_mm": float(np.max(np.linalg.norm(moved - points, axis=1))),
                                   "nmi": reg["NormalisedMutualInformation"]})
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float):
                row[key] = round(value, 3 if key in ("nmi", "dose") else 2)
    worst = {k: max(r[k] for r in rows) for k in ("err_mean_mm", "err_max_mm", "err_deg")}
    mean = {k: round(float(np.mean([r[k] for r in rows])), 2) for k in ("wall_s", "cpu_s")}
    title = (f"T1 -> PET registration, {len(rows)} subjects ({cfg.export.t1_spacing_mm} mm T1 "
             f"{list(cfg.export.t1_shape)}, PET {list(cfg.export.pet_shape)}): worst mean error "
             f"{worst['err_mean_mm']} mm, worst max {worst['err_max_mm']} mm, worst "
             f"{worst['err_deg']} deg; per subject {mean['wall_s']} s wall, {mean['cpu_s']} s CPU")
    print_table(rows, title, COLUMNS)
    print(markdown_table(rows, COLUMNS))
    print(title)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
