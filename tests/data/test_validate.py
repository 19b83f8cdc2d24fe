"""validate_site on real NIfTI files: every problem kind is reported and the rest loads."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from m2diff.data.layout import ld_path, sd_path, t1_path, write_participants
from m2diff.data.validate import validate_site

SHAPE = (16, 16, 6)
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])
MARKER = 12345.678  # a voxel value that must never appear in a message


def phantom(shape: tuple[int, ...] = SHAPE, seed: int = 0, peak: float = 100.0) -> np.ndarray:
    """A bright ellipsoid 'brain' with a hotter core on a zero background, (X, Y, Z) float32."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[:3]], indexing="ij")
    r = np.sqrt(grid[0] ** 2 + grid[1] ** 2 + (0.8 * grid[2]) ** 2)
    vol = np.where(r < 0.75, peak * (0.5 + 0.5 * (r < 0.4)), 0.0)
    vol = vol * (1 + 0.05 * rng.standard_normal(shape[:3]))
    return np.clip(vol, 0, None).astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))


def write_site(root: Path, n: int = 3, diagnoses: list[str] | None = None,
               splits: list[str] | None = None, shape: tuple[int, ...] = SHAPE,
               t1: bool = True, sd: bool = True) -> Path:
    """A site of ``n`` co-registered subjects sub-01.. with T1, LD and SD PET."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        sid = f"sub-{i + 1:02d}"
        truth = phantom(shape, seed=i)
        save(ld_path(root, sid), truth + np.random.default_rng(100 + i).normal(0, 5, shape))
        if sd:
            save(sd_path(root, sid), truth)
        if t1:
            save(t1_path(root, sid), 3.0 * phantom(shape, seed=50 + i) + 10.0)
        row = {"participant_id": sid,
               "diagnosis": (diagnoses or ["CN", "AD"])[i % len(diagnoses or ["CN", "AD"])]}
        if splits:
            row["split"] = splits[i]
        rows.append(row)
    write_participants(root, rows)
    return root


def ids(site) -> list[str]:
    return [s.id for s in site.subjects]


def messages(problems) -> str:
    return "\n".join(str(p) for p in problems)


def test_good_site_has_no_problems(tmp_path):
    root = write_site(tmp_path / "site-a")
    site, problems = validate_site(root)
    assert problems == []
    assert ids(site) == ["sub-01", "sub-02", "sub-03"]
    s = site.subjects[0]
    assert s.diagnosis == "CN" and s.t1.is_file() and s.ld.is_file() and s.sd.is_file()
    assert site.name == "site-a" and site.cohort("AD") == [site.subjects[1]]


def test_site_folder_missing_or_a_file(tmp_path):
    site, problems = validate_site(tmp_path / "nope")
    assert site.subjects == [] and len(problems) == 1 and "does not exist" in problems[0].message
    (tmp_path / "file").write_text("x")
    site, problems = validate_site(tmp_path / "file")
    assert site.subjects == [] and "not a folder" in problems[0].message


def test_participants_missing(tmp_path):
    root = write_site(tmp_path / "s")
    (root / "participants.tsv").unlink()
    site, problems = validate_site(root)
    assert site.subjects == []
    assert problems[0].file == "participants.tsv" and "missing" in problems[0].message
    assert problems[-1].message == "no usable subjects"


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe\x00bad bytes\x81", "unreadable"),
    (b"", "empty"),
    (b"participant_id\tgroup\nsub-01\tCN\n", "missing column(s) diagnosis"),
    (b"id,diagnosis\nsub-01,CN\n", "missing column(s) participant_id"),
])
def test_participants_unusable(tmp_path, content, expected):
    root = write_site(tmp_path / "s")
    (root / "participants.tsv").write_bytes(content)
    site, problems = validate_site(root)
    assert site.subjects == []
    assert expected in problems[0].message and problems[0].file == "participants.tsv"


def test_participants_crlf_bom_and_case(tmp_path):
    root = write_site(tmp_path / "s")
    (root / "participants.tsv").write_bytes(
        "\ufeffparticipant_id\tdiagnosis\tsplit\r\nsub-01\tcn\tTEST\r\nsub-02\tad\tn/a\r\n"
        "sub-03\t AD \t\r\n\r\n".encode())
    site, problems = validate_site(root)
    assert problems == []
    assert [(s.id, s.diagnosis, s.split) for s in site.subjects] == [
        ("sub-01", "CN", "test"), ("sub-02", "AD", None), ("sub-03", "AD", None)]


@pytest.mark.parametrize("rows, expected, usable", [
    ("sub-01\tCN\nsub-01\tCN\nsub-02\tAD\nsub-03\tCN", "duplicate participant_id (lines 2, 3); "
     "first row used", ["sub-01", "sub-02", "sub-03"]),
    ("sub-01\tCN\nsub-01\tAD\nsub-02\tAD\nsub-03\tCN", "different values", ["sub-02", "sub-03"]),
    ("sub-01\tMCI\nsub-02\tAD\nsub-03\tCN", "diagnosis 'MCI' is not one of CN, AD",
     ["sub-02", "sub-03"]),
    ("sub-01\t\nsub-02\tAD\nsub-03\tCN", "diagnosis empty", ["sub-02", "sub-03"]),
    ("sub-01\tCN\ttraining\nsub-02\tAD\t\nsub-03\tCN\t", "split 'training' is not one of",
     ["sub-02", "sub-03"]),
    ("sub-01\tCN\ttest\textra\nsub-02\tAD\t\nsub-03\tCN\t", "has 4 fields", ["sub-02", "sub-03"]),
    ("../sub-01\tCN\nsub-02\tAD\nsub-03\tCN", "not a plain folder name", ["sub-02", "sub-03"]),
])
def test_participants_row_problems(tmp_path, rows, expected, usable):
    root = write_site(tmp_path / "s")
    header = "participant_id\tdiagnosis" + ("\tsplit" if rows.count("\t") > 5 else "")
    (root / "participants.tsv").write_text(header + "\n" + rows + "\n")
    site, problems = validate_site(root)
    assert ids(site) == usable
    hits = [p for p in problems if expected in p.message]
    assert len(hits) == 1, messages(problems)
    assert hits[0].file == "participants.tsv"
    assert hits[0].subject in ("sub-01", "../sub-01")


def test_folder_without_row_and_row_without_folder(tmp_path):
    root = write_site(tmp_path / "s", n=3)
    write_participants(root, [{"participant_id": "sub-01", "diagnosis": "CN"},
                              {"participant_id": "sub-02", "diagnosis": "AD"},
                              {"participant_id": "sub-09", "diagnosis": "AD"}])
    (root / "derivatives").mkdir()  # not a subject folder: ignored
    site, problems = validate_site(root)
    assert ids(site) == ["sub-01", "sub-02"]
    by_subject = {p.subject: p.message for p in problems}
    assert set(by_subject) == {"sub-03", "sub-09"}
    assert "no row in participants.tsv" in by_subject["sub-03"]
    assert "folder is missing" in by_subject["sub-09"]


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _gz_truncated_data(path: Path) -> None:
    # A valid gzip stream whose NIfTI data block is short: header readable, data not.
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: 352 + 100]))


def _vol(data: np.ndarray, affine: np.ndarray = AFFINE) -> Callable[[Path], None]:
    return lambda path: save(path, data, affine)


def _with(value: float, count: int = 1) -> np.ndarray:
    data = phantom()
    data.flat[:count] = value
    return data


def _shifted() -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] += 0.5
    return affine


BREAKAGES = {
    "truncated": (_truncate, "truncated or damaged"),
    "truncated-data": (_gz_truncated_data, "truncated or damaged"),
    "not-nifti": (lambda p: p.write_text("hello, not an image"), "not a readable NIfTI"),
    "not-gzip-nifti": (lambda p: p.write_bytes(b"\x00" * 400), "not a readable NIfTI"),
    "4d": (_vol(np.stack([phantom()] * 3, axis=-1)), "expected a 3D volume, got 4D"),
    "2d": (_vol(phantom()[:, :, 0]), "expected a 3D volume, got 2D"),
    "shape": (_vol(phantom((16, 16, 5))), "shape (16, 16, 5) differs"),
    "affine": (_vol(phantom(), _shifted()), "affine differs"),
    "nan": (_vol(_with(np.nan, 3)), "3 NaN/inf voxel(s)"),
    "inf": (_vol(_with(np.inf)), "1 NaN/inf voxel(s)"),
    "zero": (_vol(np.zeros(SHAPE)), "empty volume"),
    "constant": (_vol(np.full(SHAPE, MARKER)), "constant volume"),
    "missing": (lambda p: p.unlink(), "missing"),
}
FILES = {"t1": t1_path, "ld": ld_path, "sd": sd_path}


@pytest.mark.parametrize("kind", ["t1", "ld", "sd"])
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_file_names_subject_and_file(tmp_path, kind, breakage):
    root = write_site(tmp_path / "s")
    path = FILES[kind](root, "sub-02")
    if breakage in ("shape", "affine") and kind == "ld":
        path = sd_path(root, "sub-02")  # the LD is the reference; break a partner instead
    breaker, expected = BREAKAGES[breakage]
    breaker(path)
    site, problems = validate_site(root)
    assert ids(site) == ["sub-01", "sub-03"], messages(problems)
    assert len(problems) == 1, messages(problems)
    problem = problems[0]
    assert problem.subject == "sub-02" and problem.site == "s"
    assert problem.file == str(path.relative_to(root))
    assert expected in problem.message
    assert "12345" not in str(problem) and "Traceback" not in str(problem)


def test_singleton_4d_and_tiny_affine_difference_are_accepted(tmp_path):
    root = write_site(tmp_path / "s")
    save(t1_path(root, "sub-01"), phantom()[..., None])
    save(sd_path(root, "sub-02"), phantom(), AFFINE + 1e-5)
    site, problems = validate_site(root)
    assert problems == [] and len(site.subjects) == 3


def test_small_negative_pet_is_accepted(tmp_path):
    root = write_site(tmp_path / "s")
    save(ld_path(root, "sub-01"), phantom() - 3.0)
    site, problems = validate_site(root)
    assert problems == [] and len(site.subjects) == 3


def test_optional_t1_and_sd(tmp_path):
    root = write_site(tmp_path / "s")
    t1_path(root, "sub-01").unlink()
    sd_path(root, "sub-02").unlink()
    save(t1_path(root, "sub-03"), phantom((16, 16, 5)))  # present but not co-registered

    site, problems = validate_site(root)
    assert ids(site) == []  # every subject lacks a required file
    assert {p.subject for p in problems if p.subject} == {"sub-01", "sub-02", "sub-03"}

    site, problems = validate_site(root, require_sd=False, require_t1=False)
    assert ids(site) == ["sub-01", "sub-02", "sub-03"]
    s1, s2, s3 = site.subjects
    assert s1.t1 is None and s1.sd is not None and s2.sd is None and s3.t1 is None
    assert len(problems) == 1 and problems[0].subject == "sub-03"
    assert "used without its T1w MRI" in problems[0].message


def test_every_subject_broken_is_an_empty_site(tmp_path):
    root = write_site(tmp_path / "s", n=2)
    for sid in ("sub-01", "sub-02"):
        save(ld_path(root, sid), np.zeros(SHAPE))
    site, problems = validate_site(root)
    assert site.subjects == []
    assert [p.subject for p in problems] == ["sub-01", "sub-02", None]
    assert problems[-1].message == "no usable subjects"


def test_many_problems_at_once_one_per_file(tmp_path):
    root = write_site(tmp_path / "s", n=4)
    _truncate(ld_path(root, "sub-01"))
    save(t1_path(root, "sub-01"), np.full(SHAPE, MARKER))
    sd_path(root, "sub-02").unlink()
    site, problems = validate_site(root)
    assert ids(site) == ["sub-03", "sub-04"]
    assert [(p.subject, Path(p.file).name) for p in problems] == [
        ("sub-01", "sub-01_rec-lowdose_pet.nii.gz"), ("sub-01", "sub-01_T1w.nii.gz"),
        ("sub-02", "sub-02_rec-standard_pet.nii.gz")]


def test_cached_verdict_is_the_same_and_follows_file_changes(tmp_path, monkeypatch):
    import m2diff.data.verdict as verdict

    root = write_site(tmp_path / "site-a")
    save(ld_path(root, "sub-02"), np.full(SHAPE, np.nan, np.float32))  # one broken subject
    fresh = validate_site(root)
    calls = []
    real = verdict.validate_site
    monkeypatch.setattr(verdict, "validate_site", lambda *a, **k: calls.append(a) or real(*a, **k))
    cache = tmp_path / "cache"
    first = verdict.validate_site_cached(root, cache)
    second = verdict.validate_site_cached(root, cache)
    assert first == fresh and second == fresh and len(calls) == 1  # read once, then the verdict
    # A repaired file (new size/mtime) means a fresh validation with the new verdict.
    save(ld_path(root, "sub-02"), phantom(SHAPE, seed=1))
    third = verdict.validate_site_cached(root, cache)
    assert len(calls) == 2 and ids(third[0]) == ["sub-01", "sub-02", "sub-03"] and third[1] == []
    # Other settings are another verdict; a damaged cache file is validated again.
    verdict.validate_site_cached(root, cache, require_t1=False)
    assert len(calls) == 3
    for f in cache.glob("validation-*.npz"):
        f.write_bytes(b"not a zip")
    assert verdict.validate_site_cached(root, cache) == third and len(calls) == 4


# -- hostile files -----------------------------------------------------------------------------

def _header_only(path: Path, shape: tuple[int, ...], dtype: type, payload: bytes = b"") -> None:
    """A NIfTI whose header claims ``shape`` of ``dtype``, followed by ``payload`` only."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + payload
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


def test_a_header_that_claims_gigabytes_is_refused_before_reading(tmp_path):
    import tracemalloc

    root = write_site(tmp_path / "site", n=3)
    _header_only(ld_path(root, "sub-01"), (512, 512, 1024), np.float32)  # the 74-byte attack
    assert ld_path(root, "sub-01").stat().st_size < 100
    # 255 KB of gzip that expands to 256 MB of voxels (uint8), 1 GiB once decoded as float32
    bomb = ld_path(root, "sub-02")
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((512, 512, 1024))
        hdr.set_data_dtype(np.uint8)
        hdr["vox_offset"] = 352
        f.write(hdr.binaryblock + b"\0" * 4)
        zeros = bytes(2**20)
        for _ in range(256):
            f.write(zeros)
    assert bomb.stat().st_size < 400_000
    tracemalloc.start()
    site, problems = validate_site(root)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 * 2**20, f"validation allocated {peak / 2**20:.0f} MiB"
    assert ids(site) == ["sub-03"]
    text = {p.subject: p.message for p in problems}
    assert "1024 MiB" in text["sub-01"] and "data.max_volume_mb=512" in text["sub-01"]
    assert "data.max_volume_mb=512" in text["sub-02"]
    # The bound is a site setting: a tighter one refuses the normal volumes too.
    site, problems = validate_site(root, max_volume_mb=0.001)
    assert ids(site) == [] and any(p.subject == "sub-03" for p in problems)
    from m2diff.data.nifti import VolumeTooLarge, load_volume

    with pytest.raises(VolumeTooLarge):
        load_volume(ld_path(root, "sub-01"))


def test_symbolic_links_out_of_the_site_are_refused_and_named(tmp_path):
    outside = write_site(tmp_path / "elsewhere", n=2)
    root = write_site(tmp_path / "site", n=3)
    ld_path(root, "sub-01").unlink()
    ld_path(root, "sub-01").symlink_to(ld_path(outside, "sub-01"))  # a file out of the site
    shutil.rmtree(root / "sub-02")
    (root / "sub-02").symlink_to(outside / "sub-02")  # a whole subject folder
    t1 = t1_path(root, "sub-03")
    inside = root / "derivatives" / "t1.nii.gz"  # a link within the site is fine
    inside.parent.mkdir()
    t1.rename(inside)
    t1.symlink_to(inside)
    site, problems = validate_site(root)
    assert ids(site) == ["sub-03"]
    text = {(p.subject, p.file): p.message for p in problems}
    assert "leading outside the site folder; refused" in text[("sub-01", "sub-01/pet/sub-01_rec-lowdose_pet.nii.gz")]
    assert "subject folder is a symbolic link leading outside" in text[("sub-02", "sub-02")]
    assert len(problems) == 2
    (root / "participants.tsv").rename(tmp_path / "p.tsv")
    (root / "participants.tsv").symlink_to(tmp_path / "p.tsv")
    site, problems = validate_site(root)
    assert ids(site) == [] and "outside the site folder" in problems[0].message


def test_a_planted_verdict_does_not_skip_validation(tmp_path, monkeypatch):
    import m2diff.data.verdict as verdict
    from m2diff.data.cache import save_cached

    root = write_site(tmp_path / "site", n=2)
    save(ld_path(root, "sub-02"), np.full(SHAPE, np.nan, np.float32))  # broken
    cache, state = tmp_path / "cache", tmp_path / "state"
    honest = verdict.validate_site_cached(root, cache, state_dir=state)
    assert ids(honest[0]) == ["sub-01"]
    assert (state / "verdict.key").stat().st_mode & 0o777 == 0o600
    # Someone who can write the cache folder plants a verdict that calls sub-02 usable.
    [path] = cache.glob("validation-*.npz")
    with np.load(path) as f:
        key, text = str(f["__key__"]), str(f["verdict"])
    forged = text.replace('"subjects": [', '"subjects": [{"id": "sub-02", "diagnosis": "AD", '
                          '"t1": "sub-02/anat/sub-02_T1w.nii.gz", "ld": '
                          '"sub-02/pet/sub-02_rec-lowdose_pet.nii.gz", "sd": '
                          '"sub-02/pet/sub-02_rec-standard_pet.nii.gz", "split": null}, ')
    assert forged != text
    calls = []
    real = verdict.validate_site
    monkeypatch.setattr(verdict, "validate_site", lambda *a, **k: calls.append(a) or real(*a, **k))
    for planted in ({"verdict": np.array(forged), "mac": np.array("0" * 64)},
                    {"verdict": np.array(forged)}):
        save_cached(path, key, planted)
        site, _ = verdict.validate_site_cached(root, cache, state_dir=state)
        assert ids(site) == ["sub-01"]  # validated again, the forgery overwritten
    assert len(calls) == 2
    # The site's own signed verdict is still used as it was.
    assert verdict.validate_site_cached(root, cache, state_dir=state) == honest and len(calls) == 2
