"""Planning a run: each study's plan read on its own is the plan of the whole selection's."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cohortflow.models.database import open_index
from cohortflow.models.schema import (
    Blob,
    Instance,
    Patient,
    SelectedSeries,
    Selection,
    Series,
    Study,
)
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.run.plan import plan_studies, plan_study


def test_one_study_planned_alone_as_in_the_whole_selection(tmp_path: Path) -> None:
    """plan_study reads only its study's selected series (each of a study's steps plans it:
    reading the whole selection each time grew with the square of the selection), and gives
    the same plan: series, roles, archive files, content key. Series of the study that the
    selection did not choose, and other selections, stay out."""
    index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    store = ArchiveStore(tmp_path / "archive")
    moment = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with index.session() as session:
        chosen = Selection(
            protocol="dementia", date_from=dt.date(2020, 1, 1), date_to=dt.date(2026, 1, 1),
            pacs="test", protocols_file="p.yaml", protocols_sha256="0" * 64,
            created_at=moment, studies=6, series=12,
        )  # fmt: skip
        other = Selection(
            protocol="dementia", date_from=dt.date(2020, 1, 1), date_to=dt.date(2026, 1, 1),
            pacs="test", protocols_file="p.yaml", protocols_sha256="0" * 64,
            created_at=moment, studies=1, series=1,
        )  # fmt: skip
        session.add_all([chosen, other])
        session.flush()
        for s in range(6):
            patient = Patient(patient_key=f"key-{s}")
            session.add(patient)
            session.flush()
            study = Study(study_instance_uid=f"1.2.3.{s}", patient_pk=patient.id)
            session.add(study)
            session.flush()
            for n, rule in enumerate(("t1_3d", "flair", None)):
                series = Series(series_instance_uid=f"1.2.3.{s}.{n}", study_pk=study.id)
                session.add(series)
                session.flush()
                for i in range(2):
                    sha = f"{s}{n}{i}".ljust(64, "a")
                    session.add(Blob(sha256=sha, size=10, archived_at=moment))
                    session.add(
                        Instance(sop_instance_uid=f"{series.series_instance_uid}.{i}", sha256=sha,
                                 series_pk=series.id)
                    )  # fmt: skip
                if rule is not None:  # the third series: not chosen
                    session.add(
                        SelectedSeries(selection_id=chosen.id, study_instance_uid=f"1.2.3.{s}",
                                       series_instance_uid=f"1.2.3.{s}.{n}", rule=rule)
                    )  # fmt: skip
        session.add(
            SelectedSeries(selection_id=other.id, study_instance_uid="1.2.3.0",
                           series_instance_uid="1.2.3.0.2", rule="t2")
        )  # fmt: skip
        chosen_id = chosen.id
    every = plan_studies(index, store, "dementia", chosen_id)
    assert [p.study_uid for p in every] == [f"1.2.3.{s}" for s in range(6)]
    for plan in every:
        assert plan_study(index, store, "dementia", chosen_id, plan.pk) == plan
        assert [(s.series_uid[-1], s.role, len(s.files)) for s in plan.series] == [
            ("0", "t1_3d", 2),
            ("1", "flair", 2),
        ]
    assert plan_study(index, store, "dementia", chosen_id, 10_000) is None
    index.dispose()
