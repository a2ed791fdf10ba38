"""Made-up identities for synthetic patients, staff and institutions (no real person's data)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FAMILY = (
    "SMITH",
    "JONES",
    "MUELLER",
    "GARCIA",
    "NGUYEN",
    "OKAFOR",
    "ROSSI",
    "DUBOIS",
    "KOWALSKI",
    "TANAKA",
    "HANSEN",
    "OBRIEN",
    "SILVA",
    "PETROV",
    "LINDQVIST",
    "MORENO",
    "FISCHER",
    "NAKAMURA",
    "ABERNATHY",
    "QUINTERO",
    "VANDERBERG",
    "ERIKSSON",
    "MBEKI",
    "CHATTERJEE",
)
GIVEN_F = (
    "MARY",
    "ANNA",
    "FATIMA",
    "SOFIA",
    "INGRID",
    "YUKI",
    "CHIARA",
    "AGNIESZKA",
    "GRACE",
    "LUCIA",
    "HELGA",
    "AMARA",
)
GIVEN_M = (
    "JOHN",
    "PETER",
    "AHMED",
    "LUCA",
    "HANS",
    "KENJI",
    "PIOTR",
    "DIEGO",
    "OLUWASEUN",
    "MARCEL",
    "ERIK",
    "RAJESH",
)
STREETS = (
    "Elm Street",
    "Mill Lane",
    "Station Road",
    "Kastanienallee",
    "Rue des Lilas",
    "Via Roma",
    "Harbour View",
    "Birch Close",
)
CITIES = ("Springfield", "Riverton", "Lakeside", "Northbridge", "Eastwick", "Fairhaven")
INSTITUTIONS = (
    ("St Elsewhere Hospital", "1 Hospital Way, Springfield"),
    ("Riverton University Medical Centre", "200 College Road, Riverton"),
    ("Lakeside Imaging Clinic", "7 Shore Drive, Lakeside"),
)


@dataclass(frozen=True)
class Identity:
    family: str
    given: str
    sex: str
    birth_date: str  # YYYYMMDD
    patient_id: str
    other_id: str  # national-style number in OtherPatientIDsSequence
    address: str
    phone: str
    mother_maiden: str

    @property
    def dicom_name(self) -> str:
        return f"{self.family}^{self.given}"

    @property
    def display_name(self) -> str:
        return f"{self.given.title()} {self.family.title()}"


def make_identity(rng: np.random.Generator, sex: str, birth_date: str, index: int) -> Identity:
    given = GIVEN_F if sex == "F" else GIVEN_M
    # The index keeps every patient distinct even when names repeat.
    return Identity(
        family=str(rng.choice(FAMILY)),
        given=str(rng.choice(given)),
        sex=sex,
        birth_date=birth_date,
        patient_id=f"MRN{int(rng.integers(1_000_000, 9_999_999)):07d}{index % 10}",
        other_id=f"{int(rng.integers(100, 999))} {int(rng.integers(100, 999))} {index:04d}",
        address=f"{int(rng.integers(1, 250))} {rng.choice(STREETS)}, {rng.choice(CITIES)}",
        phone=f"+1-555-{int(rng.integers(100, 999))}-{int(rng.integers(1000, 9999))}",
        mother_maiden=str(rng.choice(FAMILY)),
    )


def staff_name(rng: np.random.Generator, title: str = "") -> str:
    fam = str(rng.choice(FAMILY))
    giv = str(rng.choice(GIVEN_F + GIVEN_M))
    return f"{fam}^{giv}^^{title}" if title else f"{fam}^{giv}"
