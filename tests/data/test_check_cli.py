"""``m2diff check``: one line per problem, a summary per site, exit 0 / 1 / 2, no traceback."""

from __future__ import annotations

import numpy as np

from m2diff.cli import main
from m2diff.data.check import check_sites
from m2diff.data.layout import ld_path, sd_path, t1_path
from tests.data.test_validate import SHAPE, save, write_site


def run(capsys, *words: str) -> tuple[int, str, str]:
    code = main(["check", *words])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_good_site_exits_0_with_counts(tmp_path, capsys):
    root = write_site(tmp_path / "site-a", n=3)
    code, out, err = run(capsys, f"data={root}")
    assert code == 0 and err == ""
    assert "site-a" in out and "3 usable subjects (CN 2, AD 1), 0 problems" in out


def test_problems_are_lines_and_site_still_usable(tmp_path, capsys):
    root = write_site(tmp_path / "site-a", n=3)
    save(ld_path(root, "sub-02"), np.full(SHAPE, np.nan))
    t1_path(root, "sub-03").unlink()
    code, out, err = run(capsys, f"data={root}")
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("problem:")]
    assert len(lines) == 2
    assert "sub-02" in lines[0] and "sub-02_rec-lowdose_pet.nii.gz" in lines[0]
    assert "sub-03" in lines[1] and "T1w" in lines[1]
    assert "1 usable subject (CN 1, AD 0), 2 problems" in out


def test_mri_free_and_inference_only_settings(tmp_path, capsys):
    root = write_site(tmp_path / "s", n=2)
    t1_path(root, "sub-01").unlink()
    sd_path(root, "sub-02").unlink()
    assert run(capsys, f"data={root}")[0] == 1
    code, out, _ = run(capsys, f"data={root}", "data.require_t1=false", "data.require_sd=false")
    assert code == 0 and "1 without T1" in out and "1 without standard-dose PET" in out


def test_site_with_nothing_usable_exits_1(tmp_path, capsys):
    good = write_site(tmp_path / "good", n=2)
    bad = write_site(tmp_path / "bad", n=2)
    (bad / "participants.tsv").unlink()
    code, out, err = run(capsys, f"data=[{good},{bad}]")
    assert code == 1
    assert "good" in out and "bad" in out and "no usable subjects at bad" in err


def test_missing_folder_and_garbage_exit_1_without_traceback(tmp_path, capsys):
    code, _, err = run(capsys, f"data={tmp_path / 'nope'}")
    assert code == 1 and "does not exist" in err
    junk = tmp_path / "junk"
    (junk / "sub-01" / "pet").mkdir(parents=True)
    (junk / "participants.tsv").write_bytes(b"\x00\x01\xff")
    (junk / "sub-01" / "pet" / "sub-01_rec-lowdose_pet.nii.gz").write_bytes(b"\x1f\x8b junk")
    code, _, err = run(capsys, f"data={junk}")
    assert code == 1 and "participants.tsv" in err


def test_no_data_path_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "data=DIR" in err


def test_check_sites_for_reuse(tmp_path):
    a = write_site(tmp_path / "a", n=2)
    b = write_site(tmp_path / "b", n=2, t1=False)
    sites, problems = check_sites([a, b], require_t1=False)
    assert [len(s.subjects) for s in sites] == [2, 2] and problems == []
    sites, problems = check_sites([a, b])
    assert [len(s.subjects) for s in sites] == [2, 0]
    assert {p.subject for p in problems} == {"sub-01", "sub-02", None}
