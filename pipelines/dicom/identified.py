"""Stage results of input that was not de-identified, made fit for the de-identified side.

``cohortflow qc /raw/identified/folder`` recorded the real SeriesInstanceUIDs, and the
dashboard showed them to reviewers (``/api/failures``). A stage that reads identified input now
records its results under the UIDs the anonymizer gives that series and study (the project
key's ``uid``), so they join the de-identified copy's results and name nobody, and its messages
are cleaned as descriptions are (pipelines/dicom/cleaner.py). The command's own report, for the
user who holds the identified folder, keeps the real UIDs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

from cohortflow.models.stages import BiomarkerRecord, StageRecord
from cohortflow.pipelines.dicom.cleaner import Cleaner


def is_deidentified(ds: Any) -> bool:
    """Whether a data set says it was de-identified (PatientIdentityRemoved YES, which the
    anonymizer writes)."""
    return str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() == "YES"


def is_defaced(ds: Any) -> bool:
    """Whether a data set says its recognizable visual features were removed
    (RecognizableVisualFeatures NO, which the defacer writes)."""
    return str(ds.get("RecognizableVisualFeatures", "") or "").strip().upper() == "NO"


#: the metrics that name a file a stage wrote (the converted image, volumetry's labels and
#: picture): files named by the subject's label, for input that was not de-identified its real
#: PatientID, and made of pixels no one defaced or de-identified. Not kept on the de-identified
#: side, so the dashboard neither names nor shows them.
FILE_METRICS = frozenset({"nifti", "image", "labels", "picture"})


def keyed_by_pseudonyms(row: StageRecord, uid: Callable[[str], str], clean: Cleaner) -> StageRecord:
    """``row`` under the pseudonymized UIDs, its message and findings cleaned, the files it
    names left out (``FILE_METRICS``)."""

    def finding(f: dict[str, Any]) -> dict[str, Any]:
        message = f.get("message")
        return {**f, "message": clean(message)} if isinstance(message, str) else dict(f)

    return replace(
        row,
        series_uid=uid(row.series_uid),
        study_uid=uid(row.study_uid) if row.study_uid else row.study_uid,
        message=clean(row.message) if row.message else row.message,
        findings=[finding(f) for f in row.findings],
        metrics={k: v for k, v in row.metrics.items() if k not in FILE_METRICS},
    )


Row = TypeVar("Row", bound=StageRecord | BiomarkerRecord)


def for_deidentified_side(
    rows: Sequence[Row], cleaners: Mapping[str, Cleaner], uid: Callable[[], Callable[[str], str]]
) -> list[Row]:
    """``rows`` as the index may keep them: those of the series in ``cleaners`` (input that was
    not de-identified) under the pseudonymized UIDs, stage rows' texts cleaned. ``uid`` gives
    the project key's UID function, asked for only when a row needs it."""
    if not any(r.series_uid in cleaners for r in rows):
        return list(rows)
    to_pseudo = uid()

    def one(row: Row) -> Row:
        clean = cleaners.get(row.series_uid)
        if clean is None:
            return row
        if isinstance(row, StageRecord):
            return cast(Row, keyed_by_pseudonyms(row, to_pseudo, clean))
        return replace(
            row, series_uid=to_pseudo(row.series_uid), study_uid=to_pseudo(row.study_uid)
        )

    return [one(row) for row in rows]
