"""``m2diff prepare`` refuses what it cannot use in one line; ``m2diff check`` points to it."""

from __future__ import annotations

from m2diff.cli import main
from m2diff.data.layout import t1_path
from tests.data.test_validate import phantom, save, write_site


def run(capsys, *words: str) -> tuple[int, str, str]:
    code = main(["prepare", *words])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_missing_settings_export_spreadsheet_and_foreign_output(tmp_path, capsys):
    code, _, err = run(capsys)
    assert code == 2 and "src=EXPORT_DIR and out=SITE_DIR" in err
    code, _, err = run(capsys, f"src={tmp_path / 'nope'}", f"out={tmp_path / 'site'}")
    assert code == 2 and "does not exist" in err
    export = tmp_path / "export"
    (export / "001").mkdir(parents=True)
    code, _, err = run(capsys, f"src={export}", f"out={tmp_path / 'site'}")
    assert code == 2 and "no spreadsheet" in err and "participants=FILE" in err
    (export / "participants.csv").write_text("id,dx\n001,CN\n")
    code, _, err = run(capsys, f"src={export}", f"out={tmp_path / 'site'}")
    assert code == 2 and "missing column(s) participant_id, diagnosis" in err
    foreign = tmp_path / "important"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, f"src={export}", f"out={foreign}")
    assert code == 2 and "was not written by m2diff prepare" in err
    assert (foreign / "notes.txt").read_text() == "keep me"
    code, _, err = run(capsys, f"src={export}", f"out={export / 'site'}")
    assert code == 2 and "must not be the export folder" in err


def test_export_without_usable_subject_exits_1(tmp_path, capsys):
    export = tmp_path / "export"
    (export / "001" / "nifti").mkdir(parents=True)
    (export / "participants.tsv").write_text("participant_id\tdiagnosis\n001\tMCI\n")
    code, out, err = run(capsys, f"src={export}", f"out={tmp_path / 'site'}")
    assert code == 1 and "sub-001" in err and "diagnosis 'MCI'" in err
    assert "no usable subjects" in err


def test_check_points_to_prepare_for_a_site_not_co_registered(tmp_path, capsys):
    root = write_site(tmp_path / "site-a", n=3)
    save(t1_path(root, "sub-02"), phantom((20, 20, 8)))
    assert main(["check", f"data={root}"]) == 0
    _, err = capsys.readouterr()
    assert "not co-registered" in err
    assert "hint: site-a: 1 subject(s) have T1 and PET on different grids" in err
    assert "m2diff prepare src=EXPORT_DIR out=SITE_DIR" in err
    # a sound site gets no hint
    assert main(["check", f"data={write_site(tmp_path / 'site-b', n=2)}"]) == 0
    assert "hint" not in capsys.readouterr().err
