"""The six volumes of one T1: one record for the method's result, the index's biomarker rows,
the exported table and the synthetic truth."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Volumes:
    """Intracranial, grey matter, white matter, CSF and brain (GM + WM) volume in millilitres,
    and the brain parenchymal fraction (brain / ICV)."""

    icv_ml: float
    gm_ml: float
    wm_ml: float
    csf_ml: float
    brain_ml: float
    bpf: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def of(cls, source: object) -> Volumes:
        """The volumes an object carries as attributes of these names (an index row)."""
        return cls(**{name: float(getattr(source, name)) for name in VOLUME_NAMES})

    def rounded(self) -> Volumes:
        """As the index stores them: millilitres to 0.001, the fraction to 0.00001."""
        return Volumes(**{k: round(v, 5 if k == "bpf" else 3) for k, v in self.as_dict().items()})


#: the volumes' names, in this order in every table, file and page
VOLUME_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Volumes))
