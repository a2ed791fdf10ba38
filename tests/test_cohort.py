"""Cohort discovery over the shared 12-study synthetic cohort, ingested into a fresh index:
counts against the generator's ground truth in both layers, what the de-identified layer may
show, small-cell suppression, the steward's identified layer and its audit, saved cohorts,
manifests and bad filters. (A saved cohort driving a flow run: tests/test_protocol_run.py.)"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from cohortflow.flows.cli import main
from cohortflow.models.cohort import (
    DEIDENTIFIED,
    IDENTIFIED,
    MIN_CELL_PATIENTS,
    CohortFilter,
    CountResult,
    count,
    list_series,
    parse_groups,
)
from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.disclosure import DISCLOSURE, NOISE_MAX, Disclosure
from cohortflow.models.errors import CohortQueryError
from cohortflow.models.reviews import record_review
from cohortflow.models.schema import AuditEntry, CohortSeries
from cohortflow.models.settings import load_settings
from cohortflow.models.stages import BiomarkerRecord, StageRecord, record_biomarkers, record_stages
from cohortflow.models.synth import CohortTruth, PatientTruth, SeriesTruth, StudyTruth
from cohortflow.models.volumes import Volumes
from cohortflow.pipelines.cohort.configured import protocol_roles, refresh_configured
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.synth.cohort import CohortResult

pytestmark = pytest.mark.slow

#: the series kinds each protocol's rules select (tests/test_pacs_retrieve.py agrees)
ROLES = {
    "dementia": {"t1_3d": "t1_3d", "flair_2d": "flair", "t2_cor_2d": "hippocampus_t2"},
    "ms": {"t1_3d": "t1_3d", "flair_2d": "flair", "t2_2d": "t2", "t1_post": "t1_post"},
    "open": {"t1_3d": "t1_3d", "flair_2d": "flair"},
}
PASSWORD = "correct horse battery"

Item = tuple[PatientTruth, StudyTruth, SeriesTruth]


@dataclass
class Archive:
    home: Path
    truth: CohortTruth
    key: ProjectKey

    def items(self) -> list[Item]:
        return [(p, st, se) for p in self.truth.patients for st in p.studies for se in st.series]

    def shifted(self, patient: PatientTruth, day: str) -> dt.date:
        offset = self.key.date_offset_days(f"{patient.patient_id}^HOSPITAL_MRN")
        return dt.datetime.strptime(day, "%Y%m%d").date() + dt.timedelta(days=offset)


@pytest.fixture(scope="module")
def archive(cohort: CohortResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    home = tmp_path_factory.mktemp("cohort-discovery") / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COHORTFLOW_HOME", str(home))
        patch.delenv("COHORTFLOW_CONFIG", raising=False)
        assert main(["ingest", str(cohort.out_dir / "dicom")]) in (0, 1)  # 1: planted faults
        settings = load_settings()
        key = ProjectKey.load(str(settings.pseudonym_key_source))
        yield Archive(home, cohort.truth, key)


@pytest.fixture
def env(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> Archive:
    monkeypatch.setenv("COHORTFLOW_HOME", str(archive.home))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    return archive


@pytest.fixture
def index(env: Archive) -> Iterator[IndexDB]:
    settings = load_settings()
    db = open_index(settings.index)
    refresh_configured(settings, db)
    yield db
    db.dispose()


def _count(
    session: Session,
    env: Archive,
    flt: CohortFilter,
    by: tuple[str, ...] = (),
    *,
    layer: str = DEIDENTIFIED,
    min_cell: int = MIN_CELL_PATIENTS,
) -> CountResult:
    """A count as the command line makes it: the de-identified layer's disclosure control keyed
    by the project key (``min_cell`` its smallest cell), the identified layer's audited."""
    control = Disclosure(env.key.derived(DISCLOSURE), min_cell)
    return count(session, flt, by, layer=layer, disclosure=control, actor="t")


#: how far a de-identified count may lie from the true one: the noise, then the rounding to 5
SLACK = NOISE_MAX + 5 // 2


def _agrees(layer: str, got: tuple[int | None, ...], truth: tuple[int, ...], what: object) -> None:
    """Identified counts are the truth; de-identified ones within the noise and the rounding of
    it, and multiples of 5."""
    if layer == IDENTIFIED:
        assert got == truth, what
        return
    for shown, true in zip(got, truth, strict=True):
        assert shown is not None and abs(shown - true) <= SLACK and shown % 5 == 0, (what, got)


def _truth_counts(items: list[Item]) -> tuple[int, int, int]:
    return (
        len({p.key for p, _, _ in items}),
        len({st.study_instance_uid for _, st, _ in items}),
        len(items),
    )


def _is(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.IGNORECASE) is not None


def _mr(item: Item) -> bool:
    """An MR image series (the secondary capture carries no field strength)."""
    return item[2].kind != "burned_in_sc"


def _selected(protocol: str, role: str | None = None) -> Callable[[Item], bool]:
    def test(item: Item) -> bool:
        _, st, se = item
        chosen = ROLES[protocol].get(se.kind)
        return st.protocol == protocol and chosen is not None and role in (None, chosen)

    return test


#: (filters, the ground truth's answer); every combination is checked in both layers
CASES: list[tuple[dict[str, str], Callable[[Item], bool]]] = [
    ({}, lambda i: True),
    ({"sex": "F"}, lambda i: i[0].sex == "F"),
    ({"sex": "M", "age": "65.."}, lambda i: i[0].sex == "M" and i[1].age_years >= 65),
    (
        {"field_strength": "3", "manufacturer": "siemens"},
        lambda i: _mr(i) and i[1].field_strength_t == 3.0 and _is("siemens", i[1].manufacturer),
    ),
    ({"model": "^skyra$"}, lambda i: i[1].model == "Skyra"),
    (
        {"series_description": "mprage|bravo|tfe", "acquisition": "3D"},
        lambda i: (
            _is("mprage|bravo|tfe", i[2].series_description) and i[2].kind in ("t1_3d", "t1_post")
        ),
    ),
    ({"study_description": "dementia"}, lambda i: _is("dementia", i[1].study_description)),
    ({"protocol": "dementia:t1_3d"}, _selected("dementia", "t1_3d")),
    ({"protocol": "ms", "sex": "M"}, lambda i: _selected("ms")(i) and i[0].sex == "M"),
    (
        {"protocol": "open:t1_3d", "field_strength": "1.5", "age": "..60"},
        lambda i: (
            _selected("open", "t1_3d")(i) and i[1].field_strength_t == 1.5 and i[1].age_years <= 60
        ),
    ),
    (
        {"modality": "MR", "acquisition": "2D", "age": "70.."},
        lambda i: _mr(i) and i[2].kind not in ("t1_3d", "t1_post") and i[1].age_years >= 70,
    ),
    (
        {"protocol": "dementia,open", "body_part": "^brain$", "sex": "F"},
        lambda i: (_selected("dementia")(i) or _selected("open")(i)) and i[0].sex == "F",
    ),
]


@pytest.mark.parametrize("layer", [DEIDENTIFIED, IDENTIFIED])
def test_counts_match_the_ground_truth_for_a_dozen_filter_combinations(
    index: IndexDB, env: Archive, layer: str
) -> None:
    roles = protocol_roles(load_settings())
    with index.session() as session:
        for where, truth in CASES:
            expected = _truth_counts([i for i in env.items() if truth(i)])
            assert expected[2] > 0, where  # every case matches something
            flt = CohortFilter.parse(where, roles)
            got = _count(session, env, flt, layer=layer, min_cell=1).total
            _agrees(layer, (got.patients, got.studies, got.series), expected, where)
            again = _count(session, env, flt, layer=layer, min_cell=1).total
            assert again == got  # asked again: the same answer, noise included
        # dates: real ones in the identified layer, the anonymizer's shifted ones otherwise
        if layer == IDENTIFIED:
            where = {"date": "2016-01-01..2019-12-31"}
            truth = [i for i in env.items() if "2016" <= i[1].study_date[:4] <= "2019"]
        else:
            shifted = sorted(env.shifted(p, st.study_date) for p, st, _ in env.items())
            first, last = shifted[len(shifted) // 4], shifted[3 * len(shifted) // 4]
            where = {"date": f"{first}..{last}"}
            truth = [i for i in env.items() if first <= env.shifted(i[0], i[1].study_date) <= last]
        got = _count(session, env, CohortFilter.parse(where), layer=layer, min_cell=1).total
        _agrees(layer, (got.patients, got.studies, got.series), _truth_counts(truth), where)
        assert 0 < len(truth) < len(env.items())
        # grouped by year and scanner: every cell as the ground truth has it
        grouped = _count(session, env, CohortFilter(), ("year", "scanner"), layer=layer, min_cell=1)
        cells: dict[tuple[str, str], list[Item]] = {}
        for item in env.items():
            p, st, _ = item
            year = (
                st.study_date[:4]
                if layer == IDENTIFIED
                else str(env.shifted(p, st.study_date).year)
            )
            cells.setdefault((year, f"{st.manufacturer} {st.model}"), []).append(item)
        assert {c.key for c in grouped.cells} == set(cells)
        for c in grouped.cells:
            _agrees(layer, (c.patients, c.studies, c.series), _truth_counts(cells[c.key]), c.key)


def test_the_deidentified_layer_shows_no_identifier_or_real_date(
    env: Archive, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = []
    assert main(["cohort", "list", "--limit", "0", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["total"] == len(env.items()) == len(listing["rows"])
    outputs.append(json.dumps(listing))
    for by in ("year,scanner,protocol", "role,sex,age_band", "modality,body_part,field_strength"):
        assert main(["cohort", "count", "--by", by, "--json"]) == 0
        outputs.append(capsys.readouterr().out)
    assert main(["cohort", "list", "--limit", "0"]) == 0  # the table as printed
    outputs.append(capsys.readouterr().out)
    text = "\n".join(outputs)
    planted = {i.value for i in env.truth.identifiers if len(i.value) >= 4}
    for p, st, se in env.items():
        planted |= {p.patient_id, p.birth_date, st.accession_number, st.study_instance_uid}
        planted |= {se.series_instance_uid, st.study_date}
        planted.add(dt.datetime.strptime(st.study_date, "%Y%m%d").date().isoformat())
        planted.add(dt.datetime.strptime(p.birth_date, "%Y%m%d").date().isoformat())
    # whole tokens: a short planted number may turn up inside a 39-digit pseudonymized UID
    leaked = sorted(
        v for v in planted if re.search(rf"(?<![0-9A-Za-z]){re.escape(v)}(?![0-9A-Za-z])", text)
    )
    assert not leaked
    # what it does show: pseudonyms, the anonymizer's UIDs and shifted dates, ages
    rows = {r["series"]: r for r in listing["rows"]}
    for p, st, se in env.items():
        row = rows[env.key.uid(se.series_instance_uid)]
        assert row["pseudonym"] == env.key.pseudonym(f"{p.patient_id}^HOSPITAL_MRN")
        assert row["study"] == env.key.uid(st.study_instance_uid)
        assert row["date"] == env.shifted(p, st.study_date).isoformat()
        assert row["age"] == st.age_years and row["sex"] == p.sex


def test_small_cells_are_suppressed_in_the_deidentified_layer_only(
    index: IndexDB, env: Archive
) -> None:
    with index.session() as session:
        deid = _count(session, env, CohortFilter(), ("sex", "age_band"), min_cell=3)
        ident = _count(session, env, CohortFilter(), ("sex", "age_band"), layer=IDENTIFIED)
        shown = {c.key: c for c in ident.cells}
        assert ident.total.patients == 7  # 7 >= 3: the total shows, perturbed
        _agrees(DEIDENTIFIED, (deid.total.patients,), (7,), "total")
        assert any(c.suppressed == "small" for c in deid.cells)
        for cell in deid.cells:
            full = shown[cell.key]
            assert full.patients is not None and full.suppressed is None
            if full.patients < 3:
                assert cell.suppressed == "small"
            if cell.suppressed:
                assert (cell.patients, cell.studies, cell.series, cell.instances) == (None,) * 4
            else:
                _agrees(DEIDENTIFIED, (cell.patients, cell.series),
                        (full.patients, full.series), cell.key)  # fmt: skip
        # one small cell beside others would be the total minus the rest: a second one goes
        by_sex = _count(session, env, CohortFilter.parse({"sex": "M,F"}), ("sex",), min_cell=4)
        assert [c.suppressed for c in by_sex.cells] == ["complementary", "small"]  # F 4, M 3
        # a total below the threshold is hidden too
        few = _count(session, env, CohortFilter.parse({"protocol": "dementia"}), min_cell=5)
        assert few.total.suppressed == "small" and few.total.patients is None


def test_qc_verdicts_and_biomarkers_follow_stages_and_reviews(index: IndexDB, env: Archive) -> None:
    t1s = [(st, se) for _, st, se in env.items() if se.kind == "t1_3d"]
    (st_a, a), (st_b, b), (st_c, c) = t1s[:3]
    uid = env.key.uid
    with index.session() as session:
        record_stages(
            session,
            [
                StageRecord(uid(a.series_instance_uid), uid(st_a.study_instance_uid),
                            "image_qc", "pass", "t"),
                StageRecord(uid(b.series_instance_uid), uid(st_b.study_instance_uid),
                            "image_qc", "fail", "t", reason_code="image.motion"),
                StageRecord(uid(c.series_instance_uid), uid(st_c.study_instance_uid),
                            "header_qc", "warn", "t"),
            ],
        )  # fmt: skip
        record_biomarkers(
            session,
            [
                BiomarkerRecord(uid(s.series_instance_uid), uid(st.study_instance_uid),
                                Volumes(1500.0, 600.0, 500.0, 400.0, 1100.0, 0.73), "t", "1",
                                "pass", "high")
                for st, s in ((st_a, a), (st_b, b))
            ],
        )  # fmt: skip
    settings = load_settings()
    refresh_configured(settings, index)

    def verdicts() -> dict[str, tuple[str | None, bool]]:
        with index.session() as session:
            rows = session.execute(
                select(CohortSeries.pseudo_series_uid, CohortSeries.qc_verdict,
                       CohortSeries.biomarkers)
            ).all()  # fmt: skip
        return {r[0]: (r[1], r[2]) for r in rows}

    got = verdicts()
    assert got[uid(a.series_instance_uid)] == ("pass", True)
    assert got[uid(b.series_instance_uid)] == ("fail", False)  # measured, but failed QC
    assert got[uid(c.series_instance_uid)] == ("warn", False)
    assert sum(1 for v, _ in got.values() if v is None) == len(env.items()) - 3
    with index.session() as session:
        record_review(session, uid(b.series_instance_uid), "override", "motion is mild", "rev",
                      "fail", "image.motion")  # fmt: skip
        record_review(session, uid(a.series_instance_uid), "reject", "wrong patient position",
                      "rev", "pass", None)  # fmt: skip
    refresh_configured(settings, index)
    got = verdicts()
    assert got[uid(b.series_instance_uid)] == ("warn", True)  # overridden: usable, flagged
    assert got[uid(a.series_instance_uid)] == ("fail", False)
    with index.session() as session:
        usable = _count(session, env, CohortFilter.parse({"biomarkers": "yes"}), layer=IDENTIFIED)
        judged = _count(session, env, CohortFilter.parse({"qc": "pass,warn"}), layer=IDENTIFIED)
        unjudged = _count(session, env, CohortFilter.parse({"qc": "none"}), layer=IDENTIFIED)
        by_qc = _count(session, env, CohortFilter(), ("qc",), layer=IDENTIFIED)
    assert usable.total.series == 1 and judged.total.series == 2
    assert unjudged.total.series == len(env.items()) - 3
    assert {c.key[0]: c.series for c in by_qc.cells} == {
        "fail": 1, "warn": 2, "none": len(env.items()) - 3
    }  # fmt: skip


def _steward(capsys: pytest.CaptureFixture[str]) -> None:
    for name, role in (("stew", "steward"), ("res", "researcher")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
            assert main(["users", "add", name, "--role", role, "--password-stdin"]) == 0
    capsys.readouterr()


def _audit(env: Archive, prefix: str) -> list[AuditEntry]:
    db = open_index(load_settings().index)
    try:
        with db.session() as session:
            return list(
                session.scalars(select(AuditEntry).where(AuditEntry.action.startswith(prefix)))
            )
    finally:
        db.dispose()


def test_the_identified_layer_needs_a_steward_and_every_use_is_audited(
    env: Archive, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _steward(capsys)
    before = len(_audit(env, "cohort.identified"))
    args = ["cohort", "count", "--protocol", "dementia", "--by", "year", "--identified", "--json"]
    assert main(args) == 2  # no account named
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main([*args, "--user", "res", "--password-stdin"]) == 2  # not a steward
    monkeypatch.setattr("sys.stdin", io.StringIO("wrong password\n"))
    assert main([*args, "--user", "stew", "--password-stdin"]) == 2
    assert "steward accounts only" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main([*args, "--user", "stew", "--password-stdin"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert counted["layer"] == "identified" and counted["min_cell_patients"] is None
    real_years = {
        st.study_date[:4] for _, st, se in env.items() if _selected("dementia")((_, st, se))
    }
    assert {c["year"] for c in counted["cells"]} == real_years  # real years, not suppressed
    assert all(c["suppressed"] is None for c in counted["cells"])
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    listed = ["cohort", "list", "--protocol", "dementia:t1_3d", "--identified", "--json"]
    assert main([*listed, "--user", "stew", "--password-stdin"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    accessions = {st.accession_number for _, st, se in env.items()
                  if _selected("dementia", "t1_3d")((_, st, se))}  # fmt: skip
    assert {r["accession_number"] for r in rows} == accessions
    assert all(r["patient_id"] and r["study_date"] and r["series_instance_uid"] for r in rows)
    entries = _audit(env, "cohort.identified")
    assert len(entries) == before + 2 and {e.actor for e in entries[before:]} == {"stew"}
    assert json.loads(entries[-1].detail)["filters"] == {"protocol": "dementia:t1_3d"}


def test_saved_cohorts_and_their_manifest(
    env: Archive,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _steward(capsys)
    # fewer than 5 patients: no saved cohort in the de-identified layer
    few = ["cohort", "save", "women-3t", "--sex", "F", "--field-strength", "3", "--json"]
    assert main(few) == 2
    assert "fewer than 5 patients" in " ".join(capsys.readouterr().err.split())
    save = ["cohort", "save", "mr", "--modality", "MR", "--json"]
    assert main(save) == 0
    saved = json.loads(capsys.readouterr().out)
    truth = [i for i in env.items() if _mr(i)]
    counted = (saved["patients"], saved["studies"], saved["series"])
    _agrees(DEIDENTIFIED, counted, _truth_counts(truth), "saved")
    assert main(save) == 2  # the name is taken
    assert "exists" in capsys.readouterr().err
    assert main([*save, "--replace"]) == 0
    capsys.readouterr()
    # the saved cohort is a filter of its own, and lists in both layers
    assert main(["cohort", "count", "--cohort", "mr", "--protocol", "open", "--json"]) == 0
    within = json.loads(capsys.readouterr().out)["total"]
    expected = _truth_counts([i for i in truth if _selected("open")(i)])
    if expected[0] >= MIN_CELL_PATIENTS:
        _agrees(DEIDENTIFIED, (within["patients"], within["series"]), expected[::2], "within")
    else:
        assert (within["patients"], within["suppressed"]) == (None, "small")
    assert main(["cohort", "saved", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["cohorts"]
    assert [c["name"] for c in listed] == ["mr"]
    assert listed[0]["filters"] == {"modality": "MR"}
    # the manifest holds identifiers: a steward's, audited
    out = tmp_path / "manifest.csv"
    assert main(["cohort", "manifest", "mr", "--out", str(out)]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    args = ["cohort", "manifest", "mr", "--out", str(out), "--user", "stew"]
    assert main([*args, "--password-stdin"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["study_instance_uid"] for r in rows} == {st.study_instance_uid for _, st, _ in truth}
    assert {r["accession_number"] for r in rows} == {st.accession_number for _, st, _ in truth}
    assert sum(int(r["series"]) for r in rows) == len(truth)
    assert _audit(env, "cohort.identified.manifest")[-1].actor == "stew"
    assert [e.actor for e in _audit(env, "cohort.save")]  # saving is audited too
    assert main(["cohort", "delete", "mr"]) == 0
    assert main(["cohort", "count", "--cohort", "mr"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sex", "X"], "filter sex: 'X'"),
        (["--age", "6x.."], "filter age: '6x' is not a number"),
        (["--age", "70..60"], "filter age: '70..60' ends before it starts"),
        (["--date", "2020-13-01.."], "filter date: '2020-13-01' is not a date"),
        (["--series-description", "t1_(mprage"], "filter series_description: 't1_(mprage' is not"),
        (["--protocol", "dementa"], "no protocol 'dementa' (did you mean 'dementia'?)"),
        (["--protocol", "dementia:t1"], "protocol dementia has no include rule 't1'"),
        (["--protocol", "x'; DROP TABLE series; --"], "use NAME or NAME:ROLE"),
        (["--qc", "good"], "filter qc: 'good'"),
        (["--by", "yaer"], "cannot group by 'yaer' (did you mean 'year'?)"),
    ],
)
def test_bad_filters_are_refused_naming_the_filter(
    env: Archive, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["cohort", "count", *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_filter_values_are_bound_never_pasted_into_sql(index: IndexDB, env: Archive) -> None:
    hostile = "'); DROP TABLE cohort_series; --"
    with index.session() as session:
        for name in ("series_description", "manufacturer", "model"):
            flt = CohortFilter.parse({name: re.escape(hostile)})
            assert _count(session, env, flt, min_cell=1).total.series == 0
        hostile_pattern = CohortFilter.parse({"study_description": re.escape(hostile)})
        found = list_series(session, hostile_pattern, layer=IDENTIFIED, actor="t")
        assert found.total == 0
        assert session.scalar(select(CohortSeries.id).limit(1)) is not None  # still there
    with pytest.raises(CohortQueryError, match=r"unknown filter 'sexx' \(did you mean 'sex'\?\)"):
        CohortFilter.parse({"sexx": "F"})
    assert parse_groups("year, scanner") == ("year", "scanner")


def test_listed_studies_the_archive_holds_are_decided_from_the_index(
    index: IndexDB, env: Archive
) -> None:
    """No PACS at all: archived studies are classified by the protocol's series rules from the
    index's header fields (the series the PACS query chooses), others reported."""
    from cohortflow.models.outcomes import protocol_outcome
    from cohortflow.pipelines.dicom.protocols import load_protocols
    from cohortflow.pipelines.select.listed import ListedStudy, select_listed
    from cohortflow.pipelines.select.query import record_selection

    protocols = load_protocols()
    for name in ROLES:
        studies = [st for p in env.truth.patients for st in p.studies if st.protocol == name]
        listed = [ListedStudy(st.study_instance_uid) for st in studies]
        listed.append(ListedStudy(None, "NO-SUCH-ACCESSION"))
        result = select_listed(protocols.get(name), listed, index, source="test")
        assert result.listed_from == "test" and len(result.studies) == len(studies) + 1
        chosen = {
            (s.study_instance_uid, se.series_instance_uid)
            for s in result.selected
            for se in s.chosen
        }
        expected = {
            (st.study_instance_uid, se.series_instance_uid)
            for _, st, se in env.items()
            if _selected(name)((_, st, se))
        }
        assert chosen == expected, name
        assert result.studies[-1].why == "study accession NO-SUCH-ACCESSION is not in the archive"
        # archived, never retrieved: the outcome counts them as there, not as failed retrievals
        selection_id = record_selection(index, result, Path(protocols.source))
        with index.session() as session:
            outcome = protocol_outcome(session, name, selection_id)
        assert outcome.series_retrieved == outcome.series_selected == len(expected)
    # the list chooses the studies: a study of another protocol is decided by the series rules
    other = next(st for p in env.truth.patients for st in p.studies if st.protocol == "open")
    result = select_listed(
        protocols.get("ms"), [ListedStudy(other.study_instance_uid)], index, source="test"
    )
    assert result.studies[0].series and "t1_3d" in result.studies[0].why


def test_patterns_matching_many_values_give_the_same_counts(
    index: IndexDB, env: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing the matches as parameters, listing the others, or listing either as literals
    (beyond the database's parameter limits): one answer; no database runs a pattern."""
    import cohortflow.models.cohort

    patterns = {"series_description": "t[12]|flair", "manufacturer": "^(ge|philips)"}
    with index.session() as session:
        listed = {k: _count(session, env, CohortFilter.parse({k: v}), min_cell=1).total
                  for k, v in patterns.items()}  # fmt: skip
        for limit in (2, 0):  # 2: the complement is listed; 0: the lists are literals
            monkeypatch.setattr(cohortflow.models.cohort, "MAX_LISTED_VALUES", limit)
            for k, v in patterns.items():
                flt = CohortFilter.parse({k: v})
                assert _count(session, env, flt, min_cell=1).total == listed[k]
    assert all(t.series for t in listed.values())


def test_a_pattern_cannot_hang_a_query(
    index: IndexDB, env: Archive, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 23: ``(a+)+$`` against 'aaa...b' backtracks in Python's ``re`` (time doubling with
    every character: 30 characters took minutes); RE2 answers in linear time. Patterns are
    bounded in length, and RE2's missing features are named in the refusal."""
    import time

    from cohortflow.models.cohort import MAX_PATTERN_LENGTH

    hostile = "a" * 5000 + "b"
    for text in ("(a+)+$", "^MR HEAD(.|.|.)*#", "(x+x+)+y"):
        flt = CohortFilter.parse({"series_description": text})
        started = time.perf_counter()
        assert flt.patterns["series_description"].search(hostile) is None
        assert time.perf_counter() - started < 0.5
    with index.session() as session:
        # and means what it says: the same series as its plain equivalent
        flt = CohortFilter.parse({"series_description": "(a+)+$"})
        plain = CohortFilter.parse({"series_description": "a$"})
        assert (
            _count(session, env, flt, min_cell=1).total
            == _count(session, env, plain, min_cell=1).total
        )
    with pytest.raises(CohortQueryError, match=f"at most {MAX_PATTERN_LENGTH}"):
        CohortFilter.parse({"series_description": "a" * (MAX_PATTERN_LENGTH + 1)})
    with pytest.raises(CohortQueryError, match="no look-around"):
        CohortFilter.parse({"manufacturer": "^(?!siemens)"})
    assert main(["cohort", "count", "--series-description", "(?<=x)t1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "series_description" in err and "not a regular expression this search takes" in err
