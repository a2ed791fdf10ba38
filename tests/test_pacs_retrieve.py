"""Selection and retrieval against a real Orthanc loaded with synthetic cohorts: the shared
12-study cohort (every fault class) and the protocol runs' six dementia-protocol studies, both
made once for the whole test run (18 brain studies).

Scored against the generator's ground truth: which studies and series each protocol must select,
and how many instances each series has in the PACS.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from cohortflow.flows.cli import main
from cohortflow.models import retrieval as repo
from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.scanners import KnownScanners, load_known_scanners
from cohortflow.models.schema import AuditEntry, Selection
from cohortflow.models.settings import load_settings
from cohortflow.models.synth import CohortTruth, Fault
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.pipelines.ingest.verify import verify
from cohortflow.pipelines.pacs import dicomweb, orthanc
from cohortflow.pipelines.pacs.dicomweb import DicomWebNode
from cohortflow.pipelines.pacs.dimse import PacsNode, store_files
from cohortflow.pipelines.pacs.errors import PacsError, PacsUnavailableError
from cohortflow.pipelines.pacs.scp import Received, Spool
from cohortflow.pipelines.retrieve.engine import RetrieveOutcome, RetrieveTarget, retrieve
from cohortflow.pipelines.retrieve.throttle import RetrievePolicy, Throttle, Window
from cohortflow.pipelines.select.query import record_selection, select_studies
from cohortflow.pipelines.synth.cohort import CohortResult
from tests.ingest_helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AET = "COHORTFLOW"
EVER = (dt.date(1990, 1, 1), dt.date(2030, 12, 31))
#: What each protocol must select, as the generator's series kinds.
EXPECTED_KINDS = {
    "dementia": {"t1_3d", "flair_2d", "t2_cor_2d"},
    "ms": {"t1_3d", "flair_2d", "t2_2d", "t1_post"},
    "open": {"t1_3d", "flair_2d"},
}
FAST_RETRY = RetrievePolicy(retries=1, backoff_seconds=0.05)


@dataclass
class Pacs:
    server: orthanc.OrthancServer
    node: PacsNode
    scp_port: int
    truth: CohortTruth

    def target(self, method: str = "move") -> RetrieveTarget:
        web = DicomWebNode(
            self.server.url + "/dicom-web", self.server.config.username, self.server.config.password
        )
        return RetrieveTarget(self.node, AET, method, scp_port=self.scp_port, dicomweb=web)

    def series_instances(self) -> dict[str, int]:
        """Instances of every series as the PACS holds them (a truncated file was refused)."""
        return {
            se.series_instance_uid: se.instances - (Fault.TRUNCATED_FILE in se.faults)
            for p in self.truth.patients
            for st in p.studies
            for se in st.series
        }


@pytest.fixture(scope="module")
def cohorts(cohort: CohortResult, dementia6: CohortResult) -> list[CohortResult]:
    return [cohort, dementia6]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, cohorts: list[CohortResult]) -> Iterator[Pacs]:
    if not orthanc.available():
        pytest.fail("Orthanc is required (CI installs it): run `make setup` as root")
    scp_port = free_port()
    config = orthanc.OrthancConfig(
        folder=tmp_path_factory.mktemp("orthanc"),
        http_port=free_port(),
        dicom_port=free_port(),
        modalities=(orthanc.Modality("cohortflow", AET, "127.0.0.1", scp_port),),
    )
    with orthanc.OrthancServer(config) as server:
        node = PacsNode(config.aet, "127.0.0.1", config.dicom_port)
        files = [
            p for c in cohorts for p in sorted((c.out_dir / "dicom").rglob("*")) if p.is_file()
        ]
        loaded = store_files(node, files, AET)
        assert not loaded.failed
        patients = [p for c in cohorts for p in c.truth.patients]
        truth = cohorts[0].truth.model_copy(update={"patients": patients})
        yield Pacs(server, node, scp_port, truth)


@pytest.fixture
def index(tmp_path: Path) -> Iterator[IndexDB]:
    db = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield db
    db.dispose()


@pytest.fixture(scope="module")
def scanners() -> KnownScanners:
    return load_known_scanners(None)


def _truth_selection(truth: CohortTruth, protocol: str) -> set[tuple[str, str]]:
    return {
        (st.study_instance_uid, se.series_instance_uid)
        for p in truth.patients
        for st in p.studies
        if st.protocol == protocol
        for se in st.series
        if se.kind in EXPECTED_KINDS[protocol]
    }


def _select_all(pacs: Pacs, index: IndexDB) -> list[int]:
    protocols = load_protocols()
    ids = []
    for name in EXPECTED_KINDS:
        result = select_studies(pacs.node, AET, protocols.get(name), *EVER)
        ids.append(record_selection(index, result, Path(protocols.source)))
    return ids


def _retrieve(
    pacs: Pacs,
    index: IndexDB,
    scanners: KnownScanners,
    tmp_path: Path,
    selection_id: int,
    method: str = "move",
    throttle: Throttle | None = None,
    **kwargs: object,
) -> RetrieveOutcome:
    return retrieve(
        index,
        ArchiveStore(tmp_path / "archive"),
        scanners,
        selection_id,
        pacs.target(method),
        throttle or Throttle(FAST_RETRY),
        tmp_path / "spool",
        **kwargs,  # type: ignore[arg-type]
    )


def _assert_archive_matches_pacs(pacs: Pacs, index: IndexDB, selection_ids: list[int]) -> int:
    """Every chosen series complete in the index, exactly the PACS's instances, no duplicate."""
    expected = pacs.series_instances()
    with index.session() as session:
        chosen = [se for sid in selection_ids for se in repo.chosen_series(session, sid)]
        counts = repo.archived_counts(session, [se.series_instance_uid for se in chosen])
        states = repo.retrieval_states(session, [se.series_instance_uid for se in chosen])
        rows = session.execute(
            text("select count(*), count(distinct sop_instance_uid) from instances")
        ).one()
    for se in chosen:
        assert se.expected_instances == expected[se.series_instance_uid]
        assert counts[se.series_instance_uid] == expected[se.series_instance_uid]
        assert states[se.series_instance_uid].status == "complete"
    assert rows[0] == rows[1] == sum(counts.values())  # one instance row per SOP instance
    return len({se.study_instance_uid for se in chosen})


def test_selection_matches_ground_truth_for_every_protocol(
    pacs: Pacs, figures: Callable[[str], None]
) -> None:
    protocols = load_protocols()
    lines = []
    for name in EXPECTED_KINDS:
        result = select_studies(pacs.node, AET, protocols.get(name), *EVER)
        got = {
            (s.study_instance_uid, se.series_instance_uid)
            for s in result.selected
            for se in s.chosen
        }
        truth = _truth_selection(pacs.truth, name)
        hits = len(got & truth)
        precision = hits / len(got) if got else 0.0
        recall = hits / len(truth) if truth else 0.0
        studies = len({s for s, _ in truth})
        lines.append(
            f"{name}: {len(result.selected)} studies / {len(got)} series selected, truth "
            f"{studies} / {len(truth)}; precision {precision:.1%}, recall {recall:.1%}"
        )
        assert truth and got == truth, name
    figures("selection vs ground truth\n" + "\n".join(lines))


def test_dry_run_explains_every_series(
    pacs: Pacs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _use_pacs(monkeypatch, tmp_path, pacs)
    code = main(
        ["select", "ms", "--from", "1990-01-01", "--to", "2030-12-31", "--dry-run", "--json"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and out["selection_id"] is None
    rules = {se["rule"] for s in out["studies"] if s["selected"] for se in s["series"]}
    assert {"t1_3d", "t1_post", "flair", "t2", "localizer"} <= rules
    for study in out["studies"]:
        assert study["why"]
        assert all(se["why"] and se["rule"] for se in study["series"])
    # a dry run stores no selection; what it showed of the PACS (accession numbers, dates) is
    # an identified read, audited
    index = open_index(f"sqlite:///{tmp_path / 'home' / 'index.sqlite'}")
    try:
        with index.session() as session:
            assert session.scalar(select(func.count(Selection.id))) == 0
            reads = session.scalars(
                select(AuditEntry).where(AuditEntry.action == "read.select")
            ).all()
    finally:
        index.dispose()
    assert [json.loads(r.detail)["dry_run"] for r in reads] == [True]


def _use_pacs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pacs: Pacs) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    monkeypatch.setenv("COHORTFLOW_ORTHANC__DICOM_PORT", str(pacs.node.port))
    monkeypatch.setenv("COHORTFLOW_ORTHANC__HTTP_PORT", str(pacs.server.config.http_port))
    monkeypatch.setenv("COHORTFLOW_ORTHANC__PASSWORD", pacs.server.config.password)
    monkeypatch.setenv("COHORTFLOW_RETRIEVE__SCP_PORT", str(pacs.scp_port))
    monkeypatch.setenv("COHORTFLOW_RETRIEVE__BACKOFF_SECONDS", "0.05")


def test_cli_selects_and_retrieves_every_brain_study_completely(
    pacs: Pacs,
    cohorts: list[CohortResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _use_pacs(monkeypatch, tmp_path, pacs)
    ids = []
    for name in EXPECTED_KINDS:
        assert main(["select", name, "--from", "1990-01-01", "--to", "2030-12-31", "--json"]) == 0
        ids.append(json.loads(capsys.readouterr().out)["selection_id"])
    for selection_id in ids:
        assert main(["retrieve", "--selection", str(selection_id), "--json"]) == 0
        outcome = json.loads(capsys.readouterr().out)
        assert outcome["state"] == "complete" and outcome["associations_peak"] == 1
    index = open_index(f"sqlite:///{tmp_path / 'home' / 'index.sqlite'}")
    try:
        studies = _assert_archive_matches_pacs(pacs, index, ids)
        # the archive as the command line keeps it: sealed under the home's archive key
        report = verify(index, ArchiveStore.of(load_settings()))
    finally:
        index.dispose()
    brain = {
        st.study_instance_uid
        for c in cohorts
        for p in c.truth.patients
        for st in p.studies
        if st.protocol in EXPECTED_KINDS
    }
    assert studies == len(brain) >= 15
    assert report.checked > 0 and report.ok == report.checked and not report.failed
    assert not any((tmp_path / "home" / "spool").rglob("*.dcm"))  # the spool was handed over
    # a second run fetches nothing: every study is already complete in the archive
    assert main(["retrieve", "--selection", str(ids[0]), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {s["status"] for s in again["studies"]} == {"already"}
    assert again["associations_opened"] == 0


@pytest.mark.parametrize("method", ["get", "dicomweb"])
def test_other_methods_retrieve_completely(
    pacs: Pacs, index: IndexDB, scanners: KnownScanners, tmp_path: Path, method: str
) -> None:
    ids = _select_all(pacs, index)
    outcome = _retrieve(pacs, index, scanners, tmp_path, ids[0], method)
    assert outcome.state == "complete", outcome
    _assert_archive_matches_pacs(pacs, index, ids[:1])


def test_dicomweb_spools_the_bytes_orthanc_stores_and_authenticates_through_a_hook(
    pacs: Pacs, tmp_path: Path
) -> None:
    """WADO-RS through dicomweb-client, streamed: every instance of a series lands in the spool
    exactly as Orthanc stores it (``GET /instances/{id}/file``: no transcoding, no rewriting).
    The credentials reach Orthanc through a session hook as well as the node's own basic
    authentication; without them, or wrong, Orthanc refuses (HTTP 401: a PacsError naming the
    URL, not an unavailable PACS). QIDO-RS lists exactly the series' instances."""
    server, config = pacs.server, pacs.server.config
    # an encoding fault changes the file, not what the PACS holds of the series
    encodings = {Fault.JPEG_LOSSLESS, Fault.IMPLICIT_VR}
    whole = [
        (st.study_instance_uid, se)
        for p in pacs.truth.patients
        for st in p.studies
        for se in st.series
        if set(se.faults) <= encodings and se.instances >= 3
    ]
    # a compressed series (the cohorts plant some): Orthanc's DICOMweb transcodes to explicit
    # VR little endian unless asked for ``transfer-syntax=*``, which would change its bytes
    study, series = next((uid, se) for uid, se in whole if Fault.JPEG_LOSSLESS in se.faults)
    uid = series.series_instance_uid
    (orthanc_id,) = server.post_json(
        "/tools/find", {"Level": "Series", "Query": {"SeriesInstanceUID": uid}}
    )
    stored = {
        i["MainDicomTags"]["SOPInstanceUID"]: server.get_bytes(f"/instances/{i['ID']}/file")
        for i in server.get(f"/series/{orthanc_id}/instances")
    }
    assert len(stored) == series.instances

    def basic(session: Any) -> None:
        session.auth = (config.username, config.password)

    url = server.url + "/dicom-web"
    hooked = DicomWebNode(url, session_hook=basic)
    spool = Spool(tmp_path / "spool")
    assert dicomweb.retrieve_series(hooked, study, uid, spool) == len(stored)
    spooled = {p.stem: p.read_bytes() for p in spool.series_folder(study, uid).glob("*.dcm")}
    assert spooled == stored
    assert sorted(dicomweb.list_instances(hooked, study, uid)) == sorted(stored)
    assert dicomweb.series_exists(hooked, study, uid)
    assert not dicomweb.series_exists(hooked, study, uid + ".999")
    assert dicomweb.list_instances(hooked, study, uid + ".999") == []
    # only the instances asked for, with the node's own basic authentication
    some = sorted(stored)[:2]
    own = DicomWebNode(url, config.username, config.password)
    assert dicomweb.retrieve_series(own, study, uid, Spool(tmp_path / "some"), some) == 2
    for refused in (DicomWebNode(url), DicomWebNode(url, config.username, "not-the-password")):
        with pytest.raises(PacsError, match="HTTP 401") as raised:
            dicomweb.retrieve_series(refused, study, uid, Spool(tmp_path / "refused"))
        assert f"{url}/studies/{study}/series/{uid}" in str(raised.value)
        assert not isinstance(raised.value, PacsUnavailableError)


@pytest.mark.parametrize("method", ["move", "get"])
def test_killing_the_pacs_mid_retrieval_then_rerunning_completes_without_duplicates(
    pacs: Pacs, index: IndexDB, scanners: KnownScanners, tmp_path: Path, method: str
) -> None:
    ids = _select_all(pacs, index)
    with index.session() as session:
        chosen = repo.chosen_series(session, ids[0])
    sizes = [
        sum(se.expected_instances or 0 for se in chosen if se.study_instance_uid == uid)
        for uid in dict.fromkeys(se.study_instance_uid for se in chosen)
    ]
    assert len(sizes) >= 3
    kill_at = sizes[0] + sizes[1] // 2  # inside the second study: the PACS dies mid-series
    received = 0
    process = pacs.server.process
    assert process is not None

    def kill_midway(_item: Received) -> None:
        nonlocal received
        received += 1
        if received == kill_at:
            os.kill(process.pid, signal.SIGKILL)

    first = _retrieve(pacs, index, scanners, tmp_path, ids[0], method, on_instance=kill_midway)
    process.wait(10)
    assert first.state == "stopped" and "unavailable" in first.message
    assert first.count("complete") >= 1 and first.count("pending") >= 1
    failed = [s for s in first.studies if s.status == "failed"]
    assert failed and all(
        se.reason_code == "pacs_unavailable"
        for s in failed
        for se in s.series
        if se.status == "failed"
    )
    with index.session() as session:
        partial = [
            st
            for st in repo.retrieval_states(
                session, [se.series_instance_uid for se in repo.chosen_series(session, ids[0])]
            ).values()
            if 0 < st.archived < (st.expected or 0)
        ]
    assert partial, "the kill should leave a series half received"
    pacs.server.process = None
    pacs.server.start()  # same storage: the PACS comes back with everything
    second = _retrieve(pacs, index, scanners, tmp_path, ids[0], method)
    assert second.state == "complete", second
    assert {s.status for s in second.studies} <= {"complete", "already"}
    assert second.count("already") == first.count("complete")
    _assert_archive_matches_pacs(pacs, index, ids[:1])


def test_association_limit_is_respected(
    pacs: Pacs, index: IndexDB, scanners: KnownScanners, tmp_path: Path
) -> None:
    ids = _select_all(pacs, index)
    one = Throttle(RetrievePolicy(max_associations=1))
    outcome = _retrieve(pacs, index, scanners, tmp_path, ids[0], throttle=one)
    # one association per study, never two at once
    assert outcome.state == "complete" and one.peak == 1 and one.opened >= len(outcome.studies)
    three = Throttle(RetrievePolicy(max_associations=3))
    outcome = _retrieve(pacs, index, scanners, tmp_path / "b", ids[1], throttle=three)
    assert outcome.state == "complete" and 1 <= three.peak <= 3


@pytest.mark.parametrize("method", ["move", "dicomweb"])
def test_deleted_study_and_incomplete_series_are_reported_not_complete(
    pacs: Pacs, index: IndexDB, scanners: KnownScanners, tmp_path: Path, method: str
) -> None:
    ids = _select_all(pacs, index)
    with index.session() as session:
        chosen = repo.chosen_series(session, ids[1])
    gone_study = chosen[0].study_instance_uid
    other = next(
        se
        for se in chosen
        if se.study_instance_uid != gone_study and (se.expected_instances or 0) > 2
    )
    deleted_orthanc_ids = _delete(pacs, gone_study, other)
    try:
        outcome = _retrieve(pacs, index, scanners, tmp_path, ids[1], method)
    finally:
        _restore(pacs, deleted_orthanc_ids)
    assert outcome.state == "failures"
    by_study = {s.study_instance_uid: s for s in outcome.studies}
    assert by_study[gone_study].status == "gone"
    assert all(se.reason_code == "gone" for se in by_study[gone_study].series)
    short = next(
        se
        for se in by_study[other.study_instance_uid].series
        if se.series_instance_uid == other.series_instance_uid
    )
    assert short.status == "incomplete" and short.archived == (other.expected_instances or 0) - 1
    assert by_study[other.study_instance_uid].attempts == 2  # retried once, within the limit
    with index.session() as session:
        states = repo.retrieval_states(session, [se.series_instance_uid for se in chosen])
    assert states[other.series_instance_uid].status == "incomplete"
    assert "of" in (states[other.series_instance_uid].reason or "")
    # back in the PACS: the rerun fetches only what is missing
    arrived: list[Received] = []
    second = _retrieve(pacs, index, scanners, tmp_path, ids[1], method, on_instance=arrived.append)
    assert len([r for r in arrived if r.series_uid == other.series_instance_uid]) == 1
    assert second.state == "complete"
    _assert_archive_matches_pacs(pacs, index, ids[1:2])


def test_outside_the_window_with_stop_fetches_nothing_and_resumes_later(
    pacs: Pacs, index: IndexDB, scanners: KnownScanners, tmp_path: Path
) -> None:
    ids = _select_all(pacs, index)
    now = dt.datetime(2026, 11, 25, 12, 0).astimezone()  # a Wednesday noon
    closed = Throttle(
        RetrievePolicy(windows=(Window.parse("Sat-Sun"),), outside_window="stop"), now=lambda: now
    )
    outcome = _retrieve(pacs, index, scanners, tmp_path, ids[0], throttle=closed)
    assert outcome.state == "paused" and "Sat" in outcome.message
    assert {s.status for s in outcome.studies} == {"pending"} and closed.opened == 0
    weekend = now + dt.timedelta(days=3)
    opened = Throttle(
        RetrievePolicy(windows=(Window.parse("Sat-Sun"),), outside_window="stop"),
        now=lambda: weekend,
    )
    assert _retrieve(pacs, index, scanners, tmp_path, ids[0], throttle=opened).state == "complete"


def test_listen_ingests_a_pushed_study(
    pacs: Pacs, index: IndexDB, scanners: KnownScanners, tmp_path: Path, cohort: CohortResult
) -> None:
    from cohortflow.pipelines.retrieve.listen import listen

    study = next(p for p in cohort.truth.patients if p.studies).studies[0]
    files = sorted(p for p in (cohort.out_dir / study.folder).rglob("*") if p.is_file())
    port = free_port()
    stop = threading.Event()
    outcomes = []
    thread = threading.Thread(
        target=lambda: outcomes.append(
            listen(
                index,
                ArchiveStore(tmp_path / "archive"),
                scanners,
                tmp_path / "spool",
                aet=AET,
                host="127.0.0.1",
                port=port,
                batch="push",
                idle_seconds=0.5,
                stop=stop,
            )
        )
    )
    thread.start()
    try:
        import time

        for _ in range(50):  # the SCP needs a moment to listen
            try:
                sent = store_files(PacsNode(AET, "127.0.0.1", port), files, "MODALITY")
                break
            except Exception:
                time.sleep(0.1)
        time.sleep(1.5)
    finally:
        stop.set()
        thread.join(30)
    outcome = outcomes[0]
    assert outcome.received == sent.sent and outcome.ingested == sent.sent
    assert outcome.ingest_runs >= 1
    with index.session() as session:
        counts = repo.archived_counts(session, [se.series_instance_uid for se in study.series])
    assert sum(counts.values()) == sent.sent


def _delete(pacs: Pacs, study_uid: str, series: repo.ChosenSeries) -> list[tuple[str, bytes]]:
    """Delete a study and one instance of another series from Orthanc; returns their files."""
    saved = []
    for level, uid in (("Study", study_uid), ("Series", series.series_instance_uid)):
        found = pacs.server.post_json(
            "/tools/find", {"Level": level, "Query": {f"{level}InstanceUID": uid}}
        )
        orthanc_id = found[0]
        if level == "Study":
            for instance in pacs.server.get(f"/studies/{orthanc_id}/instances"):
                saved.append(
                    (instance["ID"], pacs.server.get_bytes(f"/instances/{instance['ID']}/file"))
                )
            pacs.server.delete(f"/studies/{orthanc_id}")
        else:
            instance = pacs.server.get(f"/series/{orthanc_id}/instances")[-1]
            saved.append(
                (instance["ID"], pacs.server.get_bytes(f"/instances/{instance['ID']}/file"))
            )
            pacs.server.delete(f"/instances/{instance['ID']}")
    return saved


def _restore(pacs: Pacs, saved: list[tuple[str, bytes]]) -> None:
    for _id, data in saved:
        pacs.server.post_bytes("/instances", data)


def test_a_refused_association_stops_the_run_with_the_reason(
    pacs: Pacs, index: IndexDB, scanners: KnownScanners, tmp_path: Path
) -> None:
    ids = _select_all(pacs, index)
    stranger = replace(pacs.target(), local_aet="INTRUDER")  # an AE the PACS does not know
    outcome = retrieve(
        index,
        ArchiveStore(tmp_path / "archive"),
        scanners,
        ids[2],
        stranger,
        Throttle(FAST_RETRY),
        tmp_path / "spool",
    )
    assert outcome.state == "stopped" and "rejected the association" in outcome.message
    assert outcome.studies[0].status == "failed" and outcome.studies[0].attempts == 2
    assert {s.status for s in outcome.studies[1:]} == {"pending"}
    with index.session() as session:
        states = repo.retrieval_states(
            session, [se.series_instance_uid for se in repo.chosen_series(session, ids[2])]
        )
    assert all(st.status != "complete" for st in states.values())


def test_a_pacs_that_stops_answering_mid_transfer_times_out_and_resumes(
    pacs: Pacs, index: IndexDB, scanners: KnownScanners, tmp_path: Path
) -> None:
    ids = _select_all(pacs, index)
    process = pacs.server.process
    assert process is not None
    received = 0

    def freeze(_item: Received) -> None:
        nonlocal received
        received += 1
        if received == 100:
            os.kill(process.pid, signal.SIGSTOP)  # alive, holding its sockets, silent

    hung = replace(pacs.target(), timeout=2.0)
    try:
        first = retrieve(
            index,
            ArchiveStore(tmp_path / "archive"),
            scanners,
            ids[2],
            hung,
            Throttle(FAST_RETRY),
            tmp_path / "spool",
            on_instance=freeze,
        )
    finally:
        os.kill(process.pid, signal.SIGCONT)
    assert first.state == "stopped"
    assert "timed out" in first.message or "did not answer" in first.message
    second = _retrieve(pacs, index, scanners, tmp_path, ids[2])
    assert second.state == "complete"
    _assert_archive_matches_pacs(pacs, index, ids[2:3])


def test_a_manifest_selects_archived_studies_from_the_index_and_queries_the_pacs_for_the_rest(
    pacs: Pacs,
    cohorts: list[CohortResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``cohortflow select --manifest``: what a saved cohort's manifest (or any list of
    studies) becomes; then ``cohortflow retrieve`` fetches only what the archive lacks."""
    _use_pacs(monkeypatch, tmp_path, pacs)
    dementia = cohorts[1]
    studies = [st for p in dementia.truth.patients for st in p.studies]
    accessions = [st.accession_number for st in studies]
    archived, by_accession, by_uid = (
        studies[0],
        next(st for st in studies[1:] if accessions.count(st.accession_number) == 1),
        studies[-1],
    )
    assert main(["ingest", str(dementia.out_dir / archived.folder)]) in (0, 1)
    capsys.readouterr()
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "study_instance_uid,accession_number\n"
        f"{archived.study_instance_uid},\n,{by_accession.accession_number}\n"
        f"{by_uid.study_instance_uid},\n2.25.1234567890,\n"
    )
    assert main(["select", "dementia", "--manifest", str(manifest), "--json"]) == 0
    selection = json.loads(capsys.readouterr().out)
    assert selection["listed_from"] == f"manifest {manifest}"
    assert selection["studies_found"] == 4 and selection["studies_selected"] == 3
    found = {s["study_instance_uid"]: s for s in selection["studies"]}
    assert found["2.25.1234567890"]["why"] == (
        "study 2.25.1234567890 is not in the archive or the PACS"
    )
    for study in (archived, by_accession, by_uid):
        chosen = {se["series_instance_uid"] for se in found[study.study_instance_uid]["series"]
                  if se["selected"]}  # fmt: skip
        assert chosen == {se.series_instance_uid for se in study.series
                          if se.kind in EXPECTED_KINDS["dementia"]}  # fmt: skip
    assert main(["retrieve", "--json"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    status = {s["study_instance_uid"]: s["status"] for s in outcome["studies"]}
    assert outcome["state"] == "complete"
    assert status == {
        archived.study_instance_uid: "already",
        by_accession.study_instance_uid: "complete",
        by_uid.study_instance_uid: "complete",
    }
