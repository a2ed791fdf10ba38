"""What is known of a series beside any stage's result: the protocol it is judged under, its
role in that protocol, and the scanner that made it. Every stage row carries it; the run hands it
from step to step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SeriesDescriptor:
    """A series' protocol, role and scanner; an empty text is stored as unknown (None)."""

    protocol: str | None = None
    role: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    software_versions: str | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value == "":
                object.__setattr__(self, name, None)

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def of_record(cls, record: Any) -> SeriesDescriptor:
        """From a stage's result that carries the five as attributes of the same names."""
        return cls(
            record.protocol,
            record.role,
            record.manufacturer,
            record.model,
            record.software_versions,
        )

    @classmethod
    def of(cls, data: Mapping[str, object]) -> SeriesDescriptor:
        """From a mapping with the same keys (a stored hand-over)."""

        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        return cls(
            protocol=text("protocol"),
            role=text("role"),
            manufacturer=text("manufacturer"),
            model=text("model"),
            software_versions=text("software_versions"),
        )


@dataclass(frozen=True)
class NotTaken:
    """A series a stage did not take, and why (not selected by the protocol, no protocol, not an
    MR image...)."""

    study: str
    series: str
    folder: str
    description: str
    reason_code: str
    reason: str
    #: the input files of the series: every file is accounted for
    files: int = 0
