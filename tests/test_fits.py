"""The head-fit store (register once): a fit is kept by content and read back; a store that
cannot be written, or a damaged file, only costs the registration again."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cohortflow.models.fits import FitStore


def test_a_fit_is_kept_and_read_back_and_a_damaged_one_ignored(tmp_path: Path) -> None:
    store = FitStore(tmp_path / "fits")
    matrix = np.arange(16.0).reshape(4, 4)
    assert store.get("ab" * 32) is None
    assert store.put("ab" * 32, matrix)
    assert (store.get("ab" * 32) == matrix).all()
    (kept,) = (tmp_path / "fits").rglob("*.json")
    kept.write_text('{"subject_to_template": [[1, 2], [3, 4]]}')  # not 4 x 4
    assert store.get("ab" * 32) is None


def test_a_store_that_cannot_be_written_does_not_stop_the_fit(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # as a full disk or a read-only cache would refuse
    store = FitStore(blocked)
    assert store.put("cd" * 32, np.eye(4)) is False
    assert store.get("cd" * 32) is None
    assert blocked.read_text() == "not a folder"


def test_a_registration_kept_as_files_is_read_back_whole_or_not_at_all(tmp_path: Path) -> None:
    """Volumetry's deformable stage: ANTs' transform files, copied under the key, listed by a
    manifest written last."""
    store = FitStore(tmp_path / "fits")
    warp, affine = tmp_path / "s_1Warp.nii.gz", tmp_path / "head_fit.mat"
    warp.write_bytes(b"warp field")
    affine.write_bytes(b"affine")
    key = "ef" * 32
    assert store.get_files(key) is None
    assert store.put_files(key, [warp, affine])
    kept = store.get_files(key)
    assert kept is not None and [p.read_bytes() for p in kept] == [b"warp field", b"affine"]
    assert [p.name for p in kept] == [f"{key}.0.nii.gz", f"{key}.1.mat"]
    assert not list((tmp_path / "fits").rglob("*.tmp"))
    kept[0].unlink()  # a store emptied by hand: registered again
    assert store.get_files(key) is None
    manifest = kept[0].with_name(f"{key}.json")
    manifest.write_text('{"files": ["../../s_1Warp.nii.gz"]}')  # names only, under the key
    assert store.get_files(key) is None
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert FitStore(blocked).put_files(key, [warp]) is False
    assert blocked.read_text() == "not a folder"
