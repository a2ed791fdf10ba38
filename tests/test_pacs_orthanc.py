"""The project's own Orthanc, started for real: locked down, and loaded over DICOM (C-STORE)."""

from __future__ import annotations

import base64
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cohortflow.pipelines.pacs import orthanc
from cohortflow.pipelines.pacs.dimse import PacsNode, echo, store_files
from cohortflow.pipelines.pacs.errors import PacsError
from cohortflow.pipelines.synth.cohort import CohortResult
from tests.ingest_helpers import free_port, pydicom_file

pytestmark = pytest.mark.integration

LOCAL_AET = "COHORTFLOW"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[orthanc.OrthancServer]:
    if not orthanc.available():
        pytest.fail("Orthanc is required (CI installs it): run `make setup` as root")
    config = orthanc.OrthancConfig(
        folder=tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        modalities=(orthanc.Modality("cohortflow", LOCAL_AET, "127.0.0.1", free_port()),),
    )
    with orthanc.OrthancServer(config) as server:
        yield server


def _node(server: orthanc.OrthancServer) -> PacsNode:
    return PacsNode(server.config.aet, "127.0.0.1", server.config.dicom_port)


def test_orthanc_is_locked_down(pacs: orthanc.OrthancServer) -> None:
    echo(_node(pacs), LOCAL_AET)  # the configured AE from 127.0.0.1 may talk to it
    with pytest.raises(PacsError):
        echo(_node(pacs), "INTRUDER")  # an unknown AE title may not
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(pacs.url + "/system", timeout=10)  # no password
    assert refused.value.code == 401
    wrong = urllib.request.Request(pacs.url + "/system")
    wrong.add_header("Authorization", "Basic " + base64.b64encode(b"cohortflow:no").decode())
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(wrong, timeout=10)
    assert (pacs.config.folder / "orthanc.json").stat().st_mode & 0o077 == 0


def test_store_sends_dicom_and_skips_the_rest(pacs: orthanc.OrthancServer, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    for name in (
        "MR_small.dcm",
        "CT_small.dcm",
        "ExplVR_LitEndNoMeta.dcm",
        "MR_small_RLE.dcm",
        "MR_truncated.dcm",
        "README.txt",
    ):
        shutil.copy(pydicom_file(name), drop / name)
    result = store_files(_node(pacs), sorted(drop.iterdir()), LOCAL_AET)
    assert result.sent == 4 and not result.failed
    assert sorted(Path(p).name for p, _ in result.skipped) == ["MR_truncated.dcm", "README.txt"]
    # MR_small and MR_small_RLE share a SOPInstanceUID: the PACS keeps one
    assert pacs.statistics()["CountInstances"] == 3


@pytest.mark.slow
def test_synthetic_cohort_loads_into_orthanc(
    pacs: orthanc.OrthancServer, cohort: CohortResult
) -> None:
    files = sorted(p for p in (cohort.out_dir / "dicom").rglob("*") if p.is_file())
    result = store_files(_node(pacs), files, LOCAL_AET)
    assert not result.failed
    studies = [s for p in cohort.truth.patients for s in p.studies]
    truncated = sum(1 for s in studies for se in s.series if "truncated_file" in se.faults)
    instances = sum(se.instances for s in studies for se in s.series)
    stats = pacs.statistics()
    assert stats["CountInstances"] == instances - truncated
    assert stats["CountStudies"] == len(studies)


def test_no_response_is_lost_under_load(
    pacs: orthanc.OrthancServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: pynetdicom's association thread sometimes took a C-FIND response and dropped
    it ("Received unexpected C-FIND service message"), more often with the CPU busy: a match
    lost silently, or a 60 s timeout on a lost final response."""
    from cohortflow.pipelines.pacs.dimse import Session, query_contexts

    store_files(_node(pacs), [pydicom_file("MR_small.dcm")], LOCAL_AET)
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            sum(i * i for i in range(10_000))

    burners = [threading.Thread(target=burn)]  # a busy thread widens the race window
    for t in burners:
        t.start()
    try:
        with Session(_node(pacs), LOCAL_AET, query_contexts("find"), timeout=10) as session:
            answers = [
                len(session.find("STUDY", {"PatientID": "*"}, ["StudyInstanceUID"]))
                for _ in range(400)
            ]
    finally:
        stop.set()
        for t in burners:
            t.join()
    assert answers == [1] * 400  # unguarded, 3 in 507 came back empty here
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]
