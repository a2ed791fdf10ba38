"""The series page's slice viewer (issue 25, item 3): one slice of a series' pseudonymized NIfTI
image as PNG (``/series/UID/slice.png``), what the viewer's script needs to know of it
(``/api/series/UID/volume``), read from under the outputs folder only.

Over HTTP with FastAPI's test client on a phantom written where the stages write (the label map
by volumetry's own writer): the picture's size, orientation, window and overlay; every query
parameter checked; 404 for a series without an image and for any image or label map outside
the outputs folder, by a recorded path, a relative path or a symbolic link; a login needed. In
Chromium, over a protocol run's outputs (tests/test_protocol_run.py, with
tests/viewer_helpers.py): the series pages of a measured T1 and of a defaced FLAIR, the viewer
scrolled, its overlay toggled, its opacity changed, the pictures' sizes checked.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.settings import load_settings
from cohortflow.models.stages import StageRecord, record_stages
from cohortflow.models.users import set_account
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.pipelines.volumetry.overlay import write_labels
from cohortflow.pipelines.volumetry.run import canonical_affine
from cohortflow.qc.dashboard import viewer
from cohortflow.qc.dashboard.app import create_app
from tests.review_helpers import dashboard_login

PASSWORD = "correct horse battery"

#: the phantom: RAS+ voxels of 1 x 1 x 2 mm; a bright marker at the subject's right, anterior
SHAPE = (40, 48, 24)
SPACING = (1.0, 1.0, 2.0)
MARKER = (slice(32, 38), slice(40, 46), slice(10, 14))
#: a grey window in which only the marker is white (the tissues, 300 at most, are black)
MARKER_ONLY = "&overlay=0&center=650&width=700"


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid head of three tissue classes (labels 1 CSF, 2 GM, 3 WM) with intensities
    100, 200, 300 and the marker at 1000."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    r = np.sqrt(((x - 20) / 16) ** 2 + ((y - 24) / 20) ** 2 + ((z - 12) / 10) ** 2)
    labels = np.select([r < 0.5, r < 0.75, r < 1.0], [3, 2, 1], 0).astype(np.uint8)
    image = np.where(labels > 0, 100.0 * labels, 5.0).astype(np.float32)
    image[MARKER] = 1000.0
    return image, labels


def _save_las(image: np.ndarray, path: Path) -> None:
    """``image`` (RAS+ voxels) saved left-to-right (LAS): the viewer must turn it back."""
    affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    affine[0, 3] = (SHAPE[0] - 1) * SPACING[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image[::-1]), affine), path)


@dataclass
class Site:
    client: TestClient
    index: IndexDB
    outputs: Path
    home: Path


SERIES = {
    "t1": "2.25.101",  # converted and measured: image and labels
    "flair": "2.25.102",  # converted only (defaced, not measured): image, no labels
    "header_only": "2.25.103",  # header QC only: no image
    "linked_out": "2.25.104",  # its image a link under the outputs to a file outside
    "recorded_out": "2.25.105",  # its image recorded outside the outputs
    "old_row": "2.25.106",  # converted before the image was recorded: the run's relative path
    "climbing": "2.25.107",  # a relative path climbing out of the outputs
    "labels_out": "2.25.108",  # its labels a link to a file outside the outputs
    "damaged": "2.25.109",  # its image cut short
    "huge": "2.25.110",  # its header declares 2**33 voxels
}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    home = tmp_path / "home"
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    settings = load_settings(None)
    outputs = settings.outputs
    index = open_index(settings.index)
    image, labels = _phantom()
    nifti = outputs / "dementia" / "nifti" / "sub-P1" / "ses-1" / "anat"
    t1, flair = nifti / "sub-P1_ses-1_T1w.nii.gz", nifti / "sub-P1_ses-1_FLAIR.nii.gz"
    _save_las(image, t1)
    _save_las(image[:, :, ::-1] * 0.5, flair)
    overlays = outputs / "volumetry" / "overlays"
    t1_labels = write_labels(
        overlays / "sub-P1_ses-1_T1w_labels.nii.gz", labels, canonical_affine(t1)
    )
    # the identified side beside the outputs: never served, however it is pointed at
    secret = home / "restricted" / "secret.nii.gz"
    _save_las(image * 3, secret)
    (outputs / "elsewhere").mkdir(parents=True)
    (outputs / "elsewhere" / "linked.nii.gz").symlink_to(secret)
    (overlays / "linked_labels.nii.gz").symlink_to(secret)
    damaged = nifti / "sub-P1_ses-1_T2w.nii.gz"
    damaged.write_bytes(t1.read_bytes()[:600])
    huge = nifti / "sub-P1_ses-1_PD.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    huge.write_bytes(header.binaryblock + b"\0" * 4)

    def row(series: str, stage: str, role: str, **metrics: Any) -> StageRecord:
        return StageRecord(
            series_uid=series, study_uid="2.25.100", stage=stage, status="pass",
            method_version="test", protocol="dementia", role=role, manufacturer="SIEMENS",
            model="Skyra", metrics=metrics,
        )  # fmt: skip

    named = {"pseudonym": "P1"}
    rows = [
        row(SERIES["t1"], "convert", "t1_3d", image=str(t1), description="t1_mprage", **named),
        row(SERIES["t1"], "image_qc", "t1_3d", snrd_wm=30.0, inu_range=0.3, clipped_fraction=0.0),
        row(SERIES["t1"], "volumetry", "t1_3d", image=str(t1), labels=str(t1_labels)),
        row(SERIES["flair"], "convert", "flair", image=str(flair), description="flair", **named),
        row(SERIES["header_only"], "header_qc", "t2"),
        row(SERIES["linked_out"], "convert", "t2", image=str(outputs / "elsewhere/linked.nii.gz")),
        row(SERIES["recorded_out"], "convert", "t2", image=str(secret)),
        row(SERIES["old_row"], "convert", "t1_3d", nifti=str(t1.relative_to(nifti.parents[2]))),
        row(SERIES["climbing"], "convert", "t2", nifti="../../../restricted/secret.nii.gz"),
        row(SERIES["labels_out"], "volumetry", "t1_3d", image=str(t1),
            labels=str(overlays / "linked_labels.nii.gz")),
        row(SERIES["damaged"], "convert", "t2", image=str(damaged)),
        row(SERIES["huge"], "convert", "t2", image=str(huge)),
    ]  # fmt: skip
    with index.session() as session:
        record_stages(session, rows)
        for name, role in (("rita", "reviewer"), ("sam", "researcher"), ("ada", "admin"),
                           ("stella", "steward")):  # fmt: skip
            set_account(session, name, role, PASSWORD)
    app = create_app(settings, index, qc_policy=load_protocols(settings.protocols_file).qc_of)
    with TestClient(app) as client:
        yield Site(client, index, outputs.resolve(), home)
    index.dispose()


def _picture(answer: Any) -> np.ndarray:
    assert answer.status_code == 200, answer.text[:300]
    assert answer.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))


def test_a_slice_of_the_size_and_orientation_asked_for(site: Site) -> None:
    client = site.client
    dashboard_login(client, "rita", PASSWORD)
    uid = SERIES["t1"]
    meta = client.get(f"/api/series/{uid}/volume").json()
    assert meta["shape"] == list(SHAPE) and meta["spacing_mm"] == list(SPACING)
    assert meta["overlay"] is True and meta["legend"]
    # square pixels, 2 px per mm (the longest extent, 48 mm, is under 512 px)
    expected = {"axial": (80, 96), "coronal": (80, 96), "sagittal": (96, 96)}
    for plane, (width, height) in expected.items():
        assert (meta["planes"][plane]["width"], meta["planes"][plane]["height"]) == (width, height)
        assert meta["planes"][plane]["slices"] == SHAPE[viewer.PLANES[plane].normal]
        shown = _picture(client.get(f"/series/{uid}/slice.png?plane={plane}"))
        assert shown.shape == (height, width, 3), plane
    # radiological: the subject's right on the picture's left, anterior at the top (the file
    # was saved left-to-right: the viewer turned it)
    axial = _picture(client.get(f"/series/{uid}/slice.png?plane=axial&index=12{MARKER_ONLY}"))
    bright = np.argwhere(axial[..., 0] == 255)
    # the marker's voxels 32-37 (of 40) from left to right, 40-45 (of 48) from back to front
    assert bright[:, 1].min() == 2 * (39 - 37) and bright[:, 1].max() == 2 * (39 - 32) + 1
    assert bright[:, 0].min() == 2 * (47 - 45) and bright[:, 0].max() == 2 * (47 - 40) + 1
    # superior up in sagittal planes: slices 10-13 of 24 (2 mm: 4 px each) counted from the top
    sagittal = _picture(client.get(f"/series/{uid}/slice.png?plane=sagittal&index=35{MARKER_ONLY}"))
    rows = np.flatnonzero((sagittal[..., 0] == 255).any(axis=1))
    assert (rows.min(), rows.max()) == (4 * (23 - 13), 4 * (23 - 10) + 3)
    # the overlay on and off, its opacity, the window: each changes the picture
    url = f"/series/{uid}/slice.png?plane=coronal&index=24"
    on, off = _picture(client.get(url)), _picture(client.get(url + "&overlay=false"))
    faint = _picture(client.get(url + "&opacity=0.2"))
    assert (on != off).any() and (faint != on).any() and (faint != off).any()
    assert (_picture(client.get(url + "&opacity=0")) == off).all()
    assert (off[..., 0] == off[..., 1]).all()  # grey without the overlay
    narrow = _picture(client.get(url + "&overlay=0&center=250&width=100"))
    assert (narrow != off).any() and set(np.unique(narrow)) == {0, 255}  # white matter only
    # the default window spans the head's values
    assert 0 < meta["window"]["center"] - meta["window"]["width"] / 2 < 300


def test_every_parameter_is_checked(site: Site) -> None:
    client = site.client
    dashboard_login(client, "sam", PASSWORD)
    base = f"/series/{SERIES['t1']}/slice.png"
    for query in (
        "plane=oblique", "plane=", "index=-1", "index=x", "index=99999999999", "center=nan",
        "center=inf", "center=1e13", "width=0", "width=-5", "width=nan", "opacity=1.5",
        "opacity=-0.1", "overlay=maybe",
    ):  # fmt: skip
        assert client.get(f"{base}?{query}").status_code == 422, query
    # a slice beyond the volume's: said so
    answer = client.get(f"{base}?plane=axial&index={SHAPE[2]}")
    assert answer.status_code == 400 and f"below {SHAPE[2]}" in answer.text
    assert client.get(f"{base}?plane=axial&index={SHAPE[2] - 1}").status_code == 200


def test_only_images_under_the_outputs_are_shown(site: Site) -> None:
    """No NIfTI: 404. An image recorded outside the outputs folder, reached by a link under it
    or by a relative path climbing out of it: 404, and the page shows no viewer; labels outside
    it are left out (the image without overlay). Damaged or oversized images: 404, not 500."""
    client = site.client
    dashboard_login(client, "rita", PASSWORD)
    for name in ("header_only", "linked_out", "recorded_out", "climbing", "damaged", "huge"):
        uid = SERIES[name]
        assert client.get(f"/series/{uid}/slice.png").status_code == 404, name
        assert client.get(f"/api/series/{uid}/volume").status_code == 404, name
    for name in ("header_only", "linked_out", "recorded_out", "climbing"):
        page = client.get(f"/series/{SERIES[name]}")
        assert page.status_code == 200 and 'data-testid="viewer-none"' in page.text, name
        assert 'data-testid="viewer"' not in page.text and "secret" not in page.text
    assert client.get("/series/2.25.999/slice.png").status_code == 404
    damaged = client.get(f"/api/series/{SERIES['damaged']}/volume")
    huge = client.get(f"/api/series/{SERIES['huge']}/volume")
    assert "cannot be viewed" in damaged.text and "voxels, over" in huge.text
    assert "nii" not in damaged.text + huge.text  # no file name or place in an answer
    # a run's row from before the image was recorded: its path relative to the outputs
    assert _picture(client.get(f"/series/{SERIES['old_row']}/slice.png")).shape == (96, 80, 3)
    # labels linked from outside: the image alone
    meta = client.get(f"/api/series/{SERIES['labels_out']}/volume").json()
    assert meta["overlay"] is False
    assert 'data-testid="viewer"' in client.get(f"/series/{SERIES['labels_out']}").text
    flair = client.get(f"/api/series/{SERIES['flair']}/volume").json()
    assert flair["overlay"] is False and flair["overlay_problem"] is None


def test_the_viewer_needs_a_login_and_the_read_right(site: Site) -> None:
    client = site.client
    uid = SERIES["t1"]
    answer = client.get(f"/series/{uid}/slice.png?plane=axial", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"].startswith("/login?next=")
    assert client.get(f"/api/series/{uid}/volume").status_code == 401
    for user in ("rita", "sam", "ada", "stella"):  # every role has the right to read
        client.cookies.clear()
        dashboard_login(client, user, PASSWORD)
        assert client.get(f"/series/{uid}/slice.png").status_code == 200, user
        assert client.get(f"/api/series/{uid}/volume").status_code == 200, user


def test_the_series_page_from_its_first_series(site: Site) -> None:
    """Titled by description, role and pseudonym; the viewer and its script (served by the
    dashboard); the metrics that can fail a series drawn with their ranges for the only series
    of its protocol."""
    client = site.client
    dashboard_login(client, "rita", PASSWORD)
    page = client.get(f"/series/{SERIES['t1']}")
    title = re.search(r"<title>(.*?)</title>", page.text)
    assert title and title.group(1).startswith("t1_mprage · 3D T1 · P1")
    assert SERIES["t1"] not in title.group(1)
    assert '<script src="/static/viewer.js" defer></script>' in page.text
    assert 'data-testid="viewer"' in page.text
    script = client.get("/static/viewer.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "http" not in re.sub(r"//.*", "", script.text)  # nothing fetched from elsewhere
    for name in ("snrd_wm", "inu_range", "clipped_fraction", "coverage_outside", "qi1"):
        assert f'data-metric="{name}"' in page.text, name
    plot = _picture(client.get(f"/series/{SERIES['t1']}/metrics.png"))
    assert plot.shape[1] >= 900 and plot.shape[0] >= 400
    flair = client.get(f"/series/{SERIES['flair']}")
    assert "<title>flair · FLAIR · P1" in flair.text


def test_the_volumes_kept_are_bounded(site: Site) -> None:
    """The viewer reads a series' image once for all its slices, again when it is written
    again, and keeps at most its budget of bytes."""
    client = site.client
    dashboard_login(client, "rita", PASSWORD)
    volumes = client.app.state.dashboard.volumes  # type: ignore[attr-defined]
    for index in range(3):
        client.get(f"/series/{SERIES['t1']}/slice.png?plane=axial&index={index}")
    assert len(volumes) == 1
    client.get(f"/series/{SERIES['flair']}/slice.png")
    assert len(volumes) == 2
    t1 = site.outputs / "dementia/nifti/sub-P1/ses-1/anat/sub-P1_ses-1_T1w.nii.gz"
    image, _ = _phantom()
    image[MARKER] = 0.0
    _save_las(image, t1)
    again = f"/series/{SERIES['t1']}/slice.png?plane=axial&index=12{MARKER_ONLY}"
    after = _picture(client.get(again))
    assert not (after[..., 0] == 255).any()  # read again: the marker is gone
    small = viewer.VolumeCache(max_bytes=3 * 4 * int(np.prod(SHAPE)))
    made = []

    def read(n: int) -> viewer.Volume:
        made.append(n)
        data = np.zeros(SHAPE, np.float32)
        return viewer.Volume(data, SPACING, None, (0.5, 1.0), (0.0, 1.0))

    for n in (1, 2, 3, 1, 4, 5):
        small.get(n, lambda n=n: read(n))
    assert made == [1, 2, 3, 4, 5] and len(small) == 3  # 1 was used again, 2 went first
    small.get(2, lambda: read(2))
    assert made[-1] == 2


# --- in Chromium, over what the folder commands made of a synthetic study -------------------
