"""Vendor-like scanners and the series a clinic acquires for each protocol (synthetic data).

Values follow what the three big vendors write in practice: Siemens puts the sequence protocol in
ProtocolName, GE puts the exam protocol there and the sequence in SeriesDescription, Philips
repeats the sequence name in both; private creators are the vendors' real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scanner:
    manufacturer: str
    model: str
    software_versions: str
    field_strength: float
    station_prefix: str
    known: bool = True


SCANNERS: tuple[Scanner, ...] = (
    Scanner("SIEMENS", "Prisma_fit", "syngo MR E11", 3.0, "MRC"),
    Scanner("SIEMENS", "Skyra", "syngo MR E11", 3.0, "AWP"),
    Scanner("SIEMENS", "Avanto", "syngo MR B17", 1.5, "MRA"),
    Scanner(
        "GE MEDICAL SYSTEMS",
        "DISCOVERY MR750",
        "27\\LX\\MR Software release:DV26.0_R03_2026.a",
        3.0,
        "GEMR",
    ),
    Scanner(
        "GE MEDICAL SYSTEMS",
        "SIGNA HDxt",
        "24\\LX\\MR Software release:HD16.0_V02_1131.a",
        1.5,
        "GEHD",
    ),
    Scanner("Philips Medical Systems", "Ingenia", "5.7.1\\5.7.1.2", 3.0, "PHI"),
    Scanner("Philips Medical Systems", "Achieva", "5.1.7\\5.1.7.2", 1.5, "PHA"),
)

UNKNOWN_SCANNERS: tuple[Scanner, ...] = (
    Scanner("SIEMENS", "MAGNETOM Vida", "syngo MR XA50", 3.0, "MRV", known=False),
    Scanner("Canon_Medical_Systems", "Vantage Orian", "V7.0", 1.5, "CAN", known=False),
)


def vendor(scanner: Scanner) -> str:
    return {"SIEMENS": "siemens", "GE MEDICAL SYSTEMS": "ge"}.get(scanner.manufacturer, "philips")


@dataclass(frozen=True)
class SeriesSpec:
    """One series as a protocol acquires it on one vendor."""

    kind: str
    series_description: str
    protocol_name: str
    orientation: str  # sagittal, axial, coronal, mixed
    shape: tuple[int, int, int]  # slices, rows, columns
    spacing: tuple[float, float, float]  # slice spacing, row spacing, column spacing (mm)
    slice_thickness: float
    contrast: str  # t1, t2, flair, pd, none
    acquisition: str  # 2D or 3D
    tr: float
    te: float
    ti: float | None
    flip: float
    scanning_sequence: str
    sequence_variant: str
    sequence_name: str
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND", "NORM")
    sub_samples: int = 1  # samples through each slice (slab profile of thick 2D slices)
    extra: dict[str, str] = field(default_factory=dict)


STUDY_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "dementia": ("MRI HEAD DEMENTIA PROTOCOL", "MR BRAIN MEMORY CLINIC", "MRI BRAIN DEMENTIA"),
    "ms": (
        "MRI BRAIN MS PROTOCOL",
        "MR BRAIN DEMYELINATION W/WO CONTRAST",
        "MRI HEAD MS FOLLOW UP",
    ),
    "open": ("MRI BRAIN ROUTINE", "MR HEAD WITHOUT CONTRAST", "MRI BRAIN"),
    "knee": ("MR KNEE LEFT", "MRI KNEE RIGHT WITHOUT CONTRAST"),
    "spine": ("MR LUMBAR SPINE", "MRI CERVICAL SPINE"),
}

GE_EXAM_PROTOCOL = {
    "dementia": "DEMENTIA/MEMORY",
    "ms": "MS BRAIN",
    "open": "ROUTINE BRAIN",
    "knee": "KNEE",
    "spine": "L-SPINE",
}


def t1_3d(scanner: Scanner, protocol: str, post_contrast: bool = False) -> SeriesSpec:
    v = vendor(scanner)
    three = scanner.field_strength >= 3.0
    suffix = "_post" if post_contrast else ""
    if v == "siemens":
        name = f"t1_mprage_sag_p2_iso{suffix}"
        return SeriesSpec(
            "t1_post" if post_contrast else "t1_3d",
            name,
            name,
            "sagittal",
            (176, 256, 256),
            (1.0, 1.0, 1.0),
            1.0,
            "t1",
            "3D",
            2300.0 if three else 2160.0,
            2.98 if three else 3.4,
            900.0 if three else 1100.0,
            9.0 if three else 15.0,
            "GR\\IR",
            "SK\\SP\\MP",
            "*tfl3d1_16ns",
        )
    if v == "ge":
        desc = "AX 3D BRAVO +C" if post_contrast else "AX 3D BRAVO"
        return SeriesSpec(
            "t1_post" if post_contrast else "t1_3d",
            desc,
            GE_EXAM_PROTOCOL[protocol],
            "axial",
            (150, 256, 256),
            (1.2, 1.0, 1.0),
            1.2,
            "t1",
            "3D",
            8.2 if three else 10.4,
            3.2 if three else 4.2,
            450.0,
            12.0,
            "GR",
            "SS\\SK",
            "efgre3d",
            image_type=("ORIGINAL", "PRIMARY", "OTHER"),
        )
    name = f"T1W_3D_TFE{'_+C' if post_contrast else ''}"
    return SeriesSpec(
        "t1_post" if post_contrast else "t1_3d",
        name,
        name,
        "sagittal",
        (170, 240, 240),
        (1.0, 1.0, 1.0),
        1.0,
        "t1",
        "3D",
        8.1 if three else 7.5,
        3.7 if three else 3.5,
        1000.0,
        8.0,
        "GR",
        "SP\\MP",
        "T1TFE",
        image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
    )


def _2d(
    kind: str,
    desc: str,
    protocol_name: str,
    contrast: str,
    tr: float,
    te: float,
    ti: float | None,
    thickness: float,
    slices: int,
    seq: tuple[str, str, str],
    orientation: str = "axial",
    flip: float = 90.0,
) -> SeriesSpec:
    return SeriesSpec(
        kind,
        desc,
        protocol_name,
        orientation,
        (slices, 256, 256),
        (thickness * 1.1, 0.9, 0.9),
        thickness,
        contrast,
        "2D",
        tr,
        te,
        ti,
        flip,
        *seq,
        sub_samples=3,
    )


def brain_series(scanner: Scanner, protocol: str, rng_choice: int) -> list[SeriesSpec]:
    """The series of a brain study, in acquisition order (the localizer first)."""
    v = vendor(scanner)
    ge = GE_EXAM_PROTOCOL[protocol]
    names = {
        "siemens": ("localizer", "t2_tse_tra_p2", "t2_tirm_tra_dark-fluid", "t2_tse_cor_hippo"),
        "ge": ("3-PLANE LOC", "AX T2 FSE", "AX T2 FLAIR", "COR T2 FSE HIPPO"),
        "philips": ("SURVEY", "T2W_TSE_TRA", "T2W_FLAIR_TRA", "T2W_TSE_COR_HIPPO"),
    }[v]

    def pname(n: str) -> str:
        return ge if v == "ge" else n

    se = ("SE", "SK", "tse2d1_15" if v == "siemens" else "FSE")
    ir = ("SE\\IR", "SK\\SP\\MP", "tir2d1_21" if v == "siemens" else "FLAIR")
    loc = SeriesSpec(
        "localizer",
        names[0],
        pname(names[0]),
        "mixed",
        (9, 256, 256),
        (8.0, 1.0, 1.0),
        7.0,
        "t1",
        "2D",
        8.6,
        4.0,
        None,
        20.0,
        "GR",
        "SP",
        "*fl2d1",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    series = [loc, t1_3d(scanner, protocol)]
    t2 = _2d("t2_2d", names[1], pname(names[1]), "t2", 5000.0, 98.0, None, 5.0, 24, se)
    flair = _2d(
        "flair_2d",
        names[2],
        pname(names[2]),
        "flair",
        9000.0,
        81.0,
        2500.0,
        5.0,
        24,
        ir,
        flip=150.0,
    )
    if protocol == "dementia":
        hippo = _2d(
            "t2_cor_2d",
            names[3],
            pname(names[3]),
            "t2",
            4000.0,
            90.0,
            None,
            3.0,
            28,
            se,
            orientation="coronal",
        )
        series += [flair, hippo] if rng_choice % 2 else [t2, flair, hippo]
    elif protocol == "ms":
        flair_ms = _2d(
            "flair_2d",
            names[2],
            pname(names[2]),
            "flair",
            9000.0,
            81.0,
            2500.0,
            3.0,
            40,
            ir,
            flip=150.0,
        )
        series += [t2, flair_ms, t1_3d(scanner, protocol, post_contrast=True)]
    else:
        series += [t2, flair]
    return series


def body_series(scanner: Scanner, protocol: str) -> list[SeriesSpec]:
    """Knee or spine series: studies that a brain protocol must never select."""
    v = vendor(scanner)

    def pn(n: str) -> str:
        return GE_EXAM_PROTOCOL[protocol] if v == "ge" else n

    se = ("SE", "SK", "tse2d1_3" if v == "siemens" else "FSE")
    if protocol == "knee":
        return [
            SeriesSpec(
                "localizer",
                "localizer",
                pn("localizer"),
                "mixed",
                (9, 192, 192),
                (8.0, 0.8, 0.8),
                7.0,
                "pd",
                "2D",
                8.0,
                4.0,
                None,
                20.0,
                "GR",
                "SP",
                "*fl2d1",
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            ),
            _2d(
                "pd_fs_sag",
                "pd_tse_fs_sag",
                pn("pd_tse_fs_sag"),
                "pd",
                3500.0,
                30.0,
                None,
                3.0,
                30,
                se,
                orientation="sagittal",
            ),
            _2d(
                "t1_cor",
                "t1_tse_cor",
                pn("t1_tse_cor"),
                "t1",
                600.0,
                12.0,
                None,
                3.0,
                26,
                se,
                orientation="coronal",
            ),
        ]
    return [
        SeriesSpec(
            "localizer",
            "localizer",
            pn("localizer"),
            "mixed",
            (9, 256, 256),
            (8.0, 1.2, 1.2),
            7.0,
            "t1",
            "2D",
            8.0,
            4.0,
            None,
            20.0,
            "GR",
            "SP",
            "*fl2d1",
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        ),
        _2d(
            "t2_sag",
            "t2_tse_sag",
            pn("t2_tse_sag"),
            "t2",
            3500.0,
            100.0,
            None,
            4.0,
            15,
            se,
            orientation="sagittal",
        ),
        _2d(
            "t1_sag",
            "t1_tse_sag",
            pn("t1_tse_sag"),
            "t1",
            550.0,
            10.0,
            None,
            4.0,
            15,
            se,
            orientation="sagittal",
        ),
    ]


SC_SERIES = SeriesSpec(
    "burned_in_sc",
    "Patient Protocol",
    "Patient Protocol",
    "axial",
    (1, 512, 512),
    (1.0, 0.5, 0.5),
    1.0,
    "none",
    "2D",
    0.0,
    0.0,
    None,
    0.0,
    "RM",
    "NONE",
    "",
    image_type=("DERIVED", "SECONDARY", "OTHER", "CSA REPORT"),
)

#: Mean intensity (0..1) of each tissue per contrast; "head" scales the template's scalp and fat.
CONTRASTS: dict[str, dict[str, float]] = {
    "t1": {"csf": 0.16, "gm": 0.46, "wm": 0.74, "head": 0.85, "skull": 0.03},
    "t2": {"csf": 0.95, "gm": 0.52, "wm": 0.36, "head": 0.55, "skull": 0.03},
    "flair": {"csf": 0.06, "gm": 0.58, "wm": 0.44, "head": 0.5, "skull": 0.03},
    "pd": {"csf": 0.8, "gm": 0.7, "wm": 0.6, "head": 0.7, "skull": 0.03},
}
