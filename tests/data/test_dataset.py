"""Splits, normalisation, padding, slices and the on-disk slice cache, on real NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from m2diff.config import ConfigError
from m2diff.data.dataset import (
    SliceSet,
    brain_mask,
    from_model,
    load_slices,
    pet_scale,
    prepare_volume,
    restore_std,
    restore_volume,
    split_subjects,
    to_model,
)
from m2diff.data.layout import Subject, ld_path, t1_path
from m2diff.data.normalize import crop_back, pad_or_crop, padded_size
from m2diff.data.validate import validate_site
from tests.data.test_validate import phantom, save, write_site


def subjects(n: int, split: str | None = None) -> list[Subject]:
    return [Subject(f"sub-{i:03d}", "CN", None, Path(f"/x/{i}"), None, split) for i in range(n)]


def data_cfg(**kw):
    base = {"split": [0.7, 0.1, 0.2], "min_brain_fraction": 0.05, "norm_percentile": 99.5,
            "image_size": None, "cache_dir": None}
    return OmegaConf.create({**base, **kw})


# ---- splits ----------------------------------------------------------------------------

def _ids(splits) -> dict[str, list[str]]:
    return {k: [s.id for s in v] for k, v in splits.items()}


def test_split_is_a_partition_seeded_and_roughly_proportional():
    subs = subjects(200)
    splits = split_subjects(subs, [0.7, 0.1, 0.2], seed=0)
    all_ids = sum(_ids(splits).values(), [])
    assert sorted(all_ids) == sorted(s.id for s in subs)  # each subject exactly once
    assert 110 < len(splits["train"]) < 170 and 20 < len(splits["test"]) < 65
    assert _ids(split_subjects(subs, [0.7, 0.1, 0.2], seed=0)) == _ids(splits)
    assert _ids(split_subjects(subs, [0.7, 0.1, 0.2], seed=1)) != _ids(splits)


def test_adding_a_subject_moves_no_other():
    before = split_subjects(subjects(30), [0.7, 0.1, 0.2], seed=3)
    more = subjects(31) + [Subject("sub-new", "AD", None, Path("/x/new"), None)]
    after = split_subjects(more, [0.7, 0.1, 0.2], seed=3)
    where_after = {s.id: k for k, v in after.items() for s in v}
    for k, v in before.items():
        assert all(where_after[s.id] == k for s in v)


def test_participants_split_wins():
    subs = subjects(20, split="test")
    assert _ids(split_subjects(subs, [1.0, 0.0, 0.0], seed=0))["test"] == [s.id for s in subs]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", range(12))
def test_few_subjects_still_get_train_and_test(n, seed):
    splits = split_subjects(subjects(n), [0.7, 0.1, 0.2], seed=seed)
    assert len(splits["train"]) >= 1 and len(splits["test"]) >= 1
    assert sum(len(v) for v in splits.values()) == n


def test_no_test_fraction_means_no_forced_test():
    assert split_subjects(subjects(3), [1.0, 0.0, 0.0], seed=0)["test"] == []


@pytest.mark.parametrize("bad", [[0.5, 0.5], [0, 0, 0], [-1, 1, 1], ["a", 1, 1], None])
def test_bad_fractions_raise_config_error(bad):
    with pytest.raises(ConfigError, match="data.split"):
        split_subjects(subjects(3), bad, seed=0)


# ---- normalisation, padding, masks ---------------------------------------------------------

def test_normalisation_round_trip_numpy_and_torch():
    x = phantom() * 37.0
    scale = pet_scale(x, 99.5)
    assert scale > 0 and scale <= x.max()
    y = to_model(x, scale)
    assert y.min() == pytest.approx(-1.0) and y.dtype == np.float32
    np.testing.assert_allclose(from_model(y, scale), x, rtol=1e-5, atol=1e-3)
    t = torch.from_numpy(y)
    torch.testing.assert_close(from_model(t, scale), torch.from_numpy(x), rtol=1e-5, atol=1e-3)


def test_pet_scale_is_positive_for_degenerate_volumes():
    assert pet_scale(np.zeros((4, 4, 4)), 99.5) == 1.0
    assert pet_scale(-np.ones((4, 4, 4)), 99.5) == 1.0
    assert pet_scale(np.full((4, 4, 4), np.nan), 99.5) == 1.0
    padded = np.zeros((32, 32, 6), np.float32)
    padded[8:24, 8:24] = phantom()
    assert pet_scale(padded, 99.5) == pytest.approx(pet_scale(phantom(), 99.5))


def test_pad_and_crop_round_trip():
    x = np.random.default_rng(0).random((3, 1, 15, 13)).astype(np.float32)
    size = padded_size(15, 13, stride=8)
    assert size == (16, 16)
    padded = pad_or_crop(x, size)
    assert padded.shape == (3, 1, 16, 16) and padded[..., -1, :].max() == -1.0
    np.testing.assert_array_equal(crop_back(padded, (15, 13)), x)
    assert pad_or_crop(padded, (8, 8)).shape == (3, 1, 8, 8)
    with pytest.raises(ConfigError, match="image_size"):
        padded_size(15, 13, stride=8, image_size=20)


@pytest.mark.parametrize("shape, stride", [((16, 16, 6), 4), ((15, 13, 5), 8), ((9, 20, 3), 1)])
def test_prepare_restore_round_trip(shape, stride):
    ld = phantom(shape) * 3.0 - 0.5  # small negatives survive too
    t1 = phantom(shape, seed=9)
    prep = prepare_volume(ld, t1, stride=stride, percentile=99.5)
    z = shape[2]
    assert prep.ld.shape[:2] == (z, 1) and prep.ld.shape[2] % stride == 0
    assert prep.ld.shape[3] % stride == 0 and prep.t1.shape == prep.ld.shape
    assert prep.ld.dtype == np.float32
    back = restore_volume(prep.ld, prep)
    assert back.shape == shape
    np.testing.assert_allclose(back, ld, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(restore_volume(torch.from_numpy(prep.ld), prep), ld, atol=1e-4)
    std = restore_std(np.full_like(prep.ld, 0.1), prep)
    np.testing.assert_allclose(std, 0.05 * prep.scale, rtol=1e-5)


def test_prepare_volume_never_crops_and_honours_image_size():
    prep = prepare_volume(phantom(), None, stride=4, percentile=99.5, image_size=32)
    assert prep.ld.shape == (6, 1, 32, 32) and prep.t1 is None
    prep = prepare_volume(phantom(), None, stride=4, percentile=99.5, image_size=8)
    assert prep.ld.shape == (6, 1, 16, 16)


def test_brain_mask_fills_holes_and_drops_specks():
    vol = phantom((24, 24, 8))
    vol[12, 12, 4] = 0.0  # a hole inside the brain
    vol[0, 0, 0] = 80.0  # a noise speck outside
    mask = brain_mask(vol)
    assert mask.dtype == bool and mask.shape == vol.shape
    assert mask[12, 12, 4] and not mask[0, 0, 0] and not mask[0, 12, 4]
    assert not brain_mask(np.zeros((4, 4, 4))).any()


# ---- slices and cache -------------------------------------------------------------------

@pytest.fixture
def site(tmp_path):
    root = write_site(tmp_path / "site-a", n=4, splits=["train", "train", "val", "test"])
    site, problems = validate_site(root)
    assert problems == []
    return site


def test_load_slices_shapes_values_and_padding(site):
    slices = load_slices(site, "train", data_cfg(), seed=0, stride=8)
    n = len(slices)
    assert slices.ld.shape == (n, 1, 16, 16) and slices.t1.shape == slices.sd.shape
    assert [s.id for s in slices.subjects] == ["sub-01", "sub-02"]
    assert set(slices.subject.tolist()) == {0, 1} and slices.site == "site-a"
    assert 0 < n <= 12  # brain slices only
    for arr in (slices.ld, slices.t1, slices.sd):
        assert arr.dtype == np.float32 and np.isfinite(arr).all()
    # a slice in file units is the file's slice
    i = 3
    sub = slices.subjects[slices.subject[i]]
    vol = nib.load(str(sub.ld)).get_fdata()
    np.testing.assert_allclose(from_model(slices.ld[i, 0], slices.scale[i]),
                               vol[:, :, slices.z[i]], rtol=1e-4, atol=1e-3)
    padded = load_slices(site, "train", data_cfg(), seed=0, stride=32)
    assert padded.ld.shape[-2:] == (32, 32)
    assert (padded.ld[:, :, :8] == -1).all() and (padded.ld[:, :, -8:] == -1).all()
    sized = load_slices(site, "train", data_cfg(image_size=24), seed=0, stride=8)
    assert sized.ld.shape[-2:] == (24, 24)


def test_min_brain_fraction_selects_slices(site):
    every = load_slices(site, "all", data_cfg(min_brain_fraction=0.0), seed=0, stride=4)
    assert len(every) == 4 * 6 and len(every.subjects) == 4
    some = load_slices(site, "all", data_cfg(min_brain_fraction=0.3), seed=0, stride=4)
    assert 0 < len(some) < len(every)
    assert load_slices(site, "all", data_cfg(min_brain_fraction=1.1), seed=0, stride=4).ld.shape \
        == (0, 1, 16, 16)


def test_torch_dataset_and_loader(site):
    slices = load_slices(site, "train", data_cfg(), seed=0, stride=8)
    ds = slices.torch_dataset()
    assert len(ds) == len(slices)
    item = ds[0]
    assert set(item) == {"ld", "t1", "sd"}
    assert all(v.shape == (1, 16, 16) and v.dtype == torch.float32 for v in item.values())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["ld"].shape == (4, 1, 16, 16)


def test_cache_hit_reads_no_nifti(site, monkeypatch):
    first = load_slices(site, "train", data_cfg(), seed=0, stride=8)
    cache = site.root / ".m2diff-cache"
    assert len(list(cache.glob("*.npz"))) == 2

    def fail(*a, **k):
        raise AssertionError("NIfTI read on a cache hit")

    monkeypatch.setattr(nib, "load", fail)
    second = load_slices(site, "train", data_cfg(), seed=0, stride=8)
    for a, b in ((first.ld, second.ld), (first.t1, second.t1), (first.sd, second.sd),
                 (first.z, second.z), (first.scale, second.scale)):
        np.testing.assert_array_equal(a, b)


def test_cache_invalidated_when_a_file_or_setting_changes(site, monkeypatch):
    first = load_slices(site, "train", data_cfg(), seed=0, stride=8)
    path = ld_path(site.root, "sub-01")
    st = path.stat()
    save(path, phantom(seed=0) * 2.0 + 1.0)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = load_slices(site, "train", data_cfg(), seed=0, stride=8)
    assert second.scale[second.subject == 0][0] != first.scale[first.subject == 0][0]
    assert len(list((site.root / ".m2diff-cache").glob("*.npz"))) == 2  # stale file pruned
    third = load_slices(site, "train", data_cfg(norm_percentile=90.0), seed=0, stride=8)
    assert third.scale[0] != second.scale[0]


def test_corrupt_cache_is_rebuilt(site):
    first = load_slices(site, "train", data_cfg(), seed=0, stride=8)
    for f in (site.root / ".m2diff-cache").glob("*.npz"):
        f.write_bytes(b"garbage")
    second = load_slices(site, "train", data_cfg(), seed=0, stride=8)
    np.testing.assert_array_equal(first.ld, second.ld)
    third = load_slices(site, "train", data_cfg(), seed=0, stride=8)  # rewritten, readable
    np.testing.assert_array_equal(first.ld, third.ld)


def test_cache_dir_setting(site, tmp_path):
    load_slices(site, "val", data_cfg(cache_dir=str(tmp_path / "cache")), seed=0, stride=8)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert not (site.root / ".m2diff-cache").exists()


def test_unwritable_cache_still_loads(site, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    slices = load_slices(site, "val", data_cfg(cache_dir=str(blocker / "c")), seed=0, stride=8)
    assert len(slices) > 0


def test_unknown_split_is_a_config_error(site):
    with pytest.raises(ConfigError, match="unknown split"):
        load_slices(site, "holdout", data_cfg(), seed=0, stride=8)


def test_mri_free_subjects_and_concat(tmp_path):
    root = write_site(tmp_path / "b", n=3)
    t1_path(root, "sub-02").unlink()
    site_b, problems = validate_site(root, require_t1=False)
    assert problems == []
    b = load_slices(site_b, "all", data_cfg(), seed=0, stride=8)
    assert b.t1 is not None
    assert not b.has_t1[b.subject == 1].any() and b.has_t1[b.subject == 0].all()
    assert (b.t1[b.subject == 1] == -1).all()

    root_c = tmp_path / "c"
    write_site(root_c, n=2, shape=(20, 18, 5), t1=False)
    site_c, _ = validate_site(root_c, require_t1=False)
    c = load_slices(site_c, "all", data_cfg(), seed=0, stride=8)
    assert c.t1 is None and c.ld.shape[-2:] == (24, 24)
    assert set(c.torch_dataset()[0]) == {"ld", "sd"}
    both = SliceSet.concat([b, c])
    assert len(both) == len(b) + len(c) and both.ld.shape[-2:] == (24, 24)
    assert both.t1.shape == both.ld.shape and both.site == "b,c"
    assert [s.id for s in both.subjects] == ["sub-01", "sub-02", "sub-03", "sub-01", "sub-02"]
    assert both.subject[len(b):].min() == 3
    np.testing.assert_array_equal(crop_back(both.ld[: len(b)], (16, 16)), b.ld)
