"""The review sheets of a study's defaced series, written under names that identify no one.

Per defaced series (a regular stack; the reference T1 with its skin surface), in the study's
folder ``study-<digest>`` (the first 12 hex digits of the SHA-256 of its StudyInstanceUID):

- ``<name>_deface.png``: the review sheet (``deface.sheet``), every view before | after. The
  before panels show the face: the folder belongs on the restricted side.
- ``<name>_deface-after.png``: the same views after defacing alone; it shows nothing the defaced
  series does not (what the dashboard shows).

``<name>`` is ``<pseudonym>_<SeriesDescription>_<SeriesNumber>`` from the series' header, where
the header says its identity was removed (PatientIdentityRemoved YES: PatientID is then the
pseudonym and the descriptions were cleaned). A header that does not say so (a folder defaced
before or without anonymizing) gives ``not-deidentified_<SeriesNumber>``: none of its text is
used. Each part keeps ``[A-Za-z0-9._-]`` only (anything else becomes ``-``) and is bounded; two
series of a study that would share a name both gain the first 8 hex digits of the SHA-256 of
their SeriesInstanceUID. No UID appears in a name or a folder.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from cohortflow.models.errors import GeometryError
from cohortflow.models.geometry import Plane, reference_volume, stack_pixels
from cohortflow.pipelines.atlas.template import Template
from cohortflow.pipelines.deface import sheet
from cohortflow.pipelines.imaging.preview import write_png

#: the longest pseudonym and description kept in a name (cohortflow's pseudonyms have 16)
MAX_PSEUDONYM = 24
MAX_DESCRIPTION = 40
NOT_DEIDENTIFIED = "not-deidentified"
SHEET = "_deface.png"
AFTER = "_deface-after.png"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Previews:
    """The pictures of one defaced series."""

    sheet: str  # before | after: shows the face (restricted side)
    after: str  # the after panels alone: what the dashboard may show


def study_folder(study_uid: str) -> str:
    """The folder of a study's sheets: named by a digest of its StudyInstanceUID, not by it."""
    return "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def deidentified(header: Dataset) -> bool:
    """Does the header say its patient's identity was removed (PS3.15 E.1: PatientID is then a
    pseudonym and the descriptions were cleaned)?"""
    return str(header.get("PatientIdentityRemoved") or "").strip().upper() == "YES"


def safe_part(text: object, limit: int) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._-]`` made one ``-``, no
    separator at either end, at most ``limit`` characters."""
    cleaned = _UNSAFE.sub("-", str(text or "")).strip("-._")
    return cleaned[:limit].strip("-._")


def sheet_name(header: Dataset) -> str:
    """The name of a series' sheets (without the suffix), from its header (see the module)."""
    number = safe_part(header.get("SeriesNumber"), 12)
    if not deidentified(header):
        return "_".join(p for p in (NOT_DEIDENTIFIED, number) if p)
    parts = (
        safe_part(header.get("PatientID"), MAX_PSEUDONYM) or "no-pseudonym",
        safe_part(header.get("SeriesDescription"), MAX_DESCRIPTION),
        number,
    )
    return "_".join(p for p in parts if p)


def sheet_names(headers: Mapping[str, Dataset]) -> dict[str, str]:
    """The name of each series' sheets (SeriesInstanceUID -> name), unique within the study:
    series that would share one both gain a digest of their UID."""
    names = {uid: sheet_name(header) for uid, header in headers.items()}
    shared = Counter(names.values())
    return {
        uid: name if shared[name] == 1 else f"{name}_{hashlib.sha256(uid.encode()).hexdigest()[:8]}"
        for uid, name in names.items()
    }


def write_previews(
    folder: Path,
    name: str,
    planes: list[Plane],
    before: list[npt.NDArray[np.generic]],
    after: list[npt.NDArray[np.generic]],
    removed: list[npt.NDArray[np.bool_]],
    subject_to_template: npt.NDArray[np.float64],
    template: Template,
    heads: tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]] | None = None,
) -> Previews | None:
    """Draw and write a defaced series' sheets into ``folder`` as ``name``: its pixels before
    and after defacing and the pixels defacing emptied (per instance, as read), placed with
    ``subject_to_template``; with ``heads`` (the reference T1's head before and after, on its
    LPS grid) the skin surface's row too. None for a series that is no regular stack (a
    localizer, a gap): it cannot be reformatted."""
    try:
        volume = reference_volume(planes)
    except GeometryError:
        return None
    to_lps = volume.index_to_lps()
    rows = [
        sheet.slice_views(
            stack_pixels(volume, before),
            stack_pixels(volume, after),
            stack_pixels(volume, [np.asarray(m, dtype=np.uint8) for m in removed]) > 0.5,
            to_lps,
            subject_to_template,
            template,
        )
    ]
    if heads is not None:
        rows.append(sheet.surface_views(*heads))
    paths = Previews(str(folder / f"{name}{SHEET}"), str(folder / f"{name}{AFTER}"))
    write_png(Path(paths.sheet), sheet.compose(rows, name).rgb)
    write_png(Path(paths.after), sheet.compose(rows, name, with_before=False).rgb)
    return paths
