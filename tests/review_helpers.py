"""A small archive index as a protocol run leaves it, written directly (no images): identified
patients, studies and series with planted identifiers; linkage; the run's anonymize steps;
stage results, their history and biomarkers on the pseudonymized side; a finished run.

Volumes follow a known model: brain = BPF x ICV, the dementia group's BPF 3 % lower, so
group statistics have a known answer. Every identifying value is listed in ``Cohort.planted``
so a test can check that none reaches a page, an API answer or an export.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cohortflow.models.database import IndexDB
from cohortflow.models.outcomes import SERIES_STAGES
from cohortflow.models.repository import now
from cohortflow.models.retrieval import ChosenSeries, save_selection, update_retrieval
from cohortflow.models.runs import DONE, StepRecord, finish_run, record_step, start_run
from cohortflow.models.schema import Linkage, Patient, Series, Study
from cohortflow.models.stages import BiomarkerRecord, StageRecord, record_biomarkers, record_stages
from cohortflow.models.volumes import Volumes

SCANNERS = (("SIEMENS", "Skyra", 3.0), ("GE MEDICAL SYSTEMS", "SIGNA Premier", 1.5))


@dataclass
class Subject:
    accession: str
    diagnosis: str
    series: str  # identified SeriesInstanceUID of the T1
    pseudo_series: str
    pseudo_study: str
    pseudonym: str
    age: int
    sex: str
    maker: str
    model: str
    tesla: float
    icv: float
    brain: float
    failed: str | None = None  # reason code of a planted QC failure

    @property
    def scanner(self) -> str:
        return f"{self.maker} {self.model}"


@dataclass
class Cohort:
    subjects: list[Subject]
    planted: list[str] = field(default_factory=list)

    def labels_csv(self) -> str:
        lines = ["accession_number,diagnosis"]
        lines += [f"{s.accession},{s.diagnosis}" for s in self.subjects]
        return "\n".join(lines) + "\n"


def build(index: IndexDB, n: int = 40, seed: int = 3, atrophy: float = 0.03) -> Cohort:
    """``n`` subjects, half with dementia; every fifth fails QC (header or image)."""
    rng = np.random.default_rng(seed)
    subjects: list[Subject] = []
    planted: list[str] = []
    with index.session() as session:
        for i in range(n):
            dementia = i % 2 == 1
            maker, model, tesla = SCANNERS[i % 2 if i % 3 else 0]
            icv = float(rng.normal(1500, 130))
            bpf = float(rng.normal(0.80, 0.012)) * (1 - atrophy if dementia else 1.0)
            born = dt.date(1930 + i, 1 + i % 12, 1 + i % 27)
            scanned = dt.date(2024, 3, 1 + i % 28)
            age = scanned.year - born.year - ((scanned.month, scanned.day) < (born.month, born.day))
            name, pid, accession = f"TESTNAME^PATIENT{i:02d}", f"PID{i:05d}", f"ACC{i:05d}"
            birth = born.strftime("%Y%m%d")
            study_uid, series_uid = f"1.2.826.0.1.99.{i}", f"1.2.826.0.1.99.{i}.1"
            planted += [name, pid, accession, birth, study_uid, series_uid, scanned.isoformat()]
            patient = Patient(
                patient_key=f"key-{pid}",
                patient_id=pid,
                patient_name=name,
                patient_birth_date=birth,
                patient_sex="F" if i % 4 < 2 else "M",
            )
            session.add(patient)
            session.flush()
            study = Study(
                study_instance_uid=study_uid,
                patient_pk=patient.id,
                accession_number=accession,
                study_date=scanned,
                study_description="MRI HEAD DEMENTIA",
            )
            session.add(study)
            session.flush()
            session.add(
                Series(
                    series_instance_uid=series_uid,
                    study_pk=study.id,
                    modality="MR",
                    manufacturer=maker,
                    manufacturer_model_name=model,
                    magnetic_field_strength=tesla,
                )
            )
            pseudonym = f"PSEUDO{i:04d}"
            session.add(
                Linkage(
                    patient_key=f"key-{pid}",
                    pseudonym=pseudonym,
                    date_offset_days=-17,
                    key_source="test",
                    created_at=now(),
                )
            )
            failed = None
            if i % 5 == 4:
                failed = "header.missing_slices" if i % 10 == 4 else "image.snr"
            subjects.append(
                Subject(
                    accession,
                    "dementia" if dementia else "control",
                    series_uid,
                    f"2.25.{1000 + i}",
                    f"2.25.{5000 + i}",
                    pseudonym,
                    min(age, 90),
                    patient.patient_sex or "",
                    maker,
                    model,
                    tesla,
                    icv,
                    icv * bpf,
                    failed,
                )
            )
        chosen = [
            ChosenSeries(f"1.2.826.0.1.99.{i}", s.series, s.accession, None, "t1_3d", 176)
            for i, s in enumerate(subjects)
        ]
        save_selection(
            session,
            protocol="dementia",
            date_from=dt.date(2024, 1, 1),
            date_to=dt.date(2024, 12, 31),
            pacs="TEST",
            protocols_file="protocols.yaml",
            protocols_sha256="0" * 64,
            studies=len(subjects),
            series=chosen,
        )
        run_id = start_run(session, "dementia", {}, {}, None)
        stages: list[StageRecord] = []
        volumes: list[BiomarkerRecord] = []
        for i, s in enumerate(subjects):
            update_retrieval(session, s.series, status="complete", archived=176, method="move")
            record_step(
                session,
                StepRecord(
                    "dementia",
                    f"1.2.826.0.1.99.{i}",
                    "anonymize",
                    "k",
                    "v",
                    DONE,
                    outputs={"_linked_series": {s.series: s.pseudo_series}},
                ),
            )
            # as the flow does: a failed series is still converted and released, not measured
            skipped = () if s.failed is None else ("volumetry",)
            for stage in (st for st in SERIES_STAGES if st not in skipped):
                status, code = "pass", None
                failing = "header_qc" if (s.failed or "").startswith("header") else "image_qc"
                if s.failed and stage == failing:
                    status, code = "fail", s.failed
                stages.append(
                    StageRecord(
                        series_uid=s.pseudo_series,
                        study_uid=s.pseudo_study,
                        stage=stage,
                        status=status,
                        method_version="test-1",
                        protocol="dementia",
                        role="t1_3d",
                        manufacturer=s.maker,
                        model=s.model,
                        reason_code=code,
                        message=f"planted {code}" if code else None,
                        findings=[
                            {"check": code, "severity": "fail", "value": 1, "message": "planted"}
                        ]
                        if code
                        else [],
                        metrics=_metrics_of(stage, i, s),
                        seconds=1.0,
                    )
                )
            if s.failed is None:
                gm = s.brain * 0.55
                volumes.append(
                    BiomarkerRecord(
                        s.pseudo_series,
                        s.pseudo_study,
                        Volumes(s.icv, gm, s.brain - gm, s.icv - s.brain, s.brain, s.brain / s.icv),
                        "cohortflow-volumetry",
                        "test-1",
                        "pass",
                        "normal",
                        protocol="dementia",
                    )
                )
        record_stages(session, stages)
        record_biomarkers(session, volumes)
        finish_run(session, run_id, "completed", {"outcome": {"t1_rate": 0.8, "stages": []}})
    return Cohort(subjects, planted)


def _metrics_of(stage: str, i: int, s: Subject) -> dict[str, Any]:
    """What a stage records beside its verdict: image QC its metrics (the failing ones below
    the protocol's SNR range), conversion the series' description and pseudonym."""
    if stage == "image_qc":
        snr = 4.0 + 0.1 * i if s.failed == "image.snr" else 20.0 + i
        return {"snrd_wm": snr, "snr_wm": 9.0 + 0.05 * i, "cnr": 3.0 + 0.1 * i, "efc": 0.5,
                "inu_range": 0.3, "coverage_outside": 0.0, "clipped_fraction": 0.0}  # fmt: skip
    if stage == "convert":
        return {"description": "t1_mprage_sag_p2_iso", "pseudonym": s.pseudonym}
    return {}


def login_token(client: Any) -> str:
    """The log-in form's token (the form carries it; a post without it is refused)."""
    page = client.get("/login")
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


def dashboard_login(client: Any, name: str, password: str, follow: bool = True) -> Any:
    """Log in through the dashboard's form, as a browser does (the form's token first)."""
    return client.post(
        "/login",
        data={"username": name, "password": password, "next": "/", "csrf": login_token(client)},
        follow_redirects=follow,
    )
