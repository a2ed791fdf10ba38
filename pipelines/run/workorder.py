"""One study's work order: what the steps of a protocol run hand each other.

Each step takes the order the step before returned and returns it with its own part filled in
(``dataclasses.replace``). It holds the study's pseudonymized UIDs, the scanner and role of each
series, paths and the head fit; never an identifier, because it travels through Prefect (task
parameters and results) and is stored in the index as the step's outputs
(``study_steps.outputs``, with the same keys as the run's earlier untyped hand-over, so a stored
row of an earlier version is read as an order too). What links it to the identified side (the
anonymizer's series linkage) is recorded beside it, never in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cohortflow.models.series import SeriesDescriptor
from cohortflow.pipelines.imaging.register import HeadFit
from cohortflow.pipelines.volumetry.source import Source


@dataclass(frozen=True)
class WorkOrder:
    """A study's work as far as the run got with it."""

    # anonymize
    study: str = ""  # pseudonymized StudyInstanceUID
    staging: str = ""  # the restricted folder of the anonymized files
    #: pseudonymized SeriesInstanceUID -> protocol, role and scanner
    series: Mapping[str, SeriesDescriptor] = field(default_factory=dict)
    written: int = 0  # files the anonymizer wrote
    # deface
    folders: tuple[str, ...] = ()  # the study's defaced DICOM folders (deliverables)
    head_fits: tuple[HeadFit, ...] = ()  # the study's head fitted to the head model, once
    # convert
    images: tuple[Source, ...] = ()  # the T1s for volumetry
    converted: Mapping[str, str] = field(default_factory=dict)  # NIfTI and sidecar -> series
    # volumetry
    measured: Mapping[str, str] = field(default_factory=dict)  # series -> verdict
    not_measured: int = 0  # T1s an earlier stage failed
    #: overlay picture or label map -> series
    overlays: Mapping[str, str] = field(default_factory=dict)
    # release
    released: int = 0
    quarantined: int = 0
    delivered: str = ""  # digest of what was delivered (name, size, time)

    def describe(self, series: str) -> SeriesDescriptor:
        """The series' descriptor (an empty one for a series the anonymizer did not list)."""
        return self.series.get(series, SeriesDescriptor())

    def to_json(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "staging": self.staging,
            "series": {uid: d.as_dict() for uid, d in self.series.items()},
            "written": self.written,
            "folders": list(self.folders),
            "head_fits": [fit.to_json() for fit in self.head_fits],
            "images": [_source_json(s) for s in self.images],
            "converted": dict(self.converted),
            "measured": dict(self.measured),
            "not_measured": self.not_measured,
            "overlays": dict(self.overlays),
            "released": self.released,
            "quarantined": self.quarantined,
            "delivered": self.delivered,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkOrder:
        """An order from its stored form; keys it does not know (the identified side's, which
        start with ``_``) are left out."""
        return cls(
            study=str(data.get("study") or ""),
            staging=str(data.get("staging") or ""),
            series={
                str(uid): SeriesDescriptor.of(d)
                for uid, d in dict(data.get("series") or {}).items()
            },
            written=int(data.get("written") or 0),
            folders=tuple(str(f) for f in data.get("folders") or ()),
            head_fits=tuple(HeadFit.from_json(f) for f in data.get("head_fits") or ()),
            images=tuple(_source(s) for s in data.get("images") or ()),
            converted={str(k): str(v) for k, v in dict(data.get("converted") or {}).items()},
            measured={str(k): str(v) for k, v in dict(data.get("measured") or {}).items()},
            not_measured=int(data.get("not_measured") or 0),
            overlays={str(k): str(v) for k, v in dict(data.get("overlays") or {}).items()},
            released=int(data.get("released") or 0),
            quarantined=int(data.get("quarantined") or 0),
            delivered=str(data.get("delivered") or ""),
        )


def _source_json(source: Source) -> dict[str, Any]:
    return {
        **asdict(source),
        "image": str(source.image),
        "root": str(source.root) if source.root else None,
    }


def _source(data: Mapping[str, Any]) -> Source:
    return Source(
        **{
            **data,
            "image": Path(str(data["image"])),
            "root": Path(str(data["root"])) if data.get("root") else None,
        }
    )
