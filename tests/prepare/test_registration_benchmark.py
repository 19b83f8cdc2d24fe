"""benchmarks/registration.py runs end to end at a toy size and prints its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "registration.py"


def test_registration_benchmark_prints_its_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("registration_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["export=raw_tiny", "generate=tiny", "sites=1", "subjects=1",
                        f"export_dir={tmp_path / 'raw'}"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| site-a-healthy | sub-001"))
    err_mean_mm = float(row.split("|")[7])
    assert 0.0 < err_mean_mm < 1.0 and "worst mean error" in out
