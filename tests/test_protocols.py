"""Series rules and the protocol file: every rule kind, validation, and the shipped protocols."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from cohortflow.models.errors import ConfigurationError
from cohortflow.pipelines.dicom.protocols import (
    NO_INCLUDE_RULE,
    Protocol,
    StudyQuery,
    load_protocols,
)
from cohortflow.pipelines.dicom.rules import Attributes, Match, Rule, parse_rule
from cohortflow.pipelines.select.errors import ProtocolError
from cohortflow.pipelines.synth.scanners import (
    SC_SERIES,
    SCANNERS,
    STUDY_DESCRIPTIONS,
    UNKNOWN_SCANNERS,
    Scanner,
    SeriesSpec,
    body_series,
    brain_series,
    t1_3d,
)


def rule(data: object) -> Rule:
    return parse_rule(data, "r")


def check(data: object, attrs: Attributes) -> Match:
    return rule(data).evaluate(attrs)


# --- leaves ------------------------------------------------------------------------------------


def test_regex_searches_and_explains() -> None:
    tfe = {"field": "SeriesDescription", "regex": "(?i)tfe"}
    assert check(tfe, {"SeriesDescription": "T1W_3D_TFE"}) == Match(
        True, "SeriesDescription 'T1W_3D_TFE' matches /(?i)tfe/"
    )
    assert check(tfe, {"SeriesDescription": "AX T2 FSE"}) == Match(
        False, "SeriesDescription 'AX T2 FSE' does not match /(?i)tfe/"
    )
    assert not check(
        {"field": "SeriesDescription", "regex": "tfe"}, {"SeriesDescription": "TFE"}
    ).matched


def test_regex_on_multi_valued_value_joins_with_backslash() -> None:
    data = {"field": "ImageType", "regex": r"^ORIGINAL\\PRIMARY\\M$"}
    assert check(data, {"ImageType": ["ORIGINAL", "PRIMARY", "M"]}).matched
    assert not check(data, {"ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]}).matched


def test_equals_strips_and_is_case_sensitive() -> None:
    mr = {"field": "Modality", "equals": "MR"}
    assert check(mr, {"Modality": " MR "}) == Match(True, "Modality is 'MR'")
    assert check(mr, {"Modality": "OT"}) == Match(False, "Modality 'OT' is not 'MR'")
    assert not check(mr, {"Modality": "mr"}).matched
    joined = {"field": "ScanningSequence", "equals": "GR\\IR"}
    assert check(joined, {"ScanningSequence": ["GR", "IR"]}).matched
    # a YAML number compares with the text of the returned number
    assert check(
        {"field": "MagneticFieldStrength", "equals": 3}, {"MagneticFieldStrength": 3.0}
    ).matched


def test_in_compares_strings() -> None:
    data = {"field": "MRAcquisitionType", "in": ["2D", "3D"]}
    assert check(data, {"MRAcquisitionType": "3D"}) == Match(
        True, "MRAcquisitionType '3D' is one of 2D, 3D"
    )
    assert not check(data, {"MRAcquisitionType": "3d"}).matched


def test_contains_finds_one_component() -> None:
    data = {"field": "ImageType", "contains": "LOCALIZER"}
    assert check(data, {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}) == Match(
        True, "ImageType contains LOCALIZER"
    )
    # some PACS return the multi-valued element as one backslash-separated string
    assert check(data, {"ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER"}).matched
    assert check(data, {"ImageType": ["ORIGINAL", "PRIMARY"]}) == Match(
        False, "ImageType 'ORIGINAL\\PRIMARY' does not contain LOCALIZER"
    )
    assert not check(data, {"ImageType": ["ORIGINAL", "LOCALIZER_X"]}).matched


def test_range_is_inclusive_and_numeric() -> None:
    thin = {"field": "SliceThickness", "min": 0.5, "max": 1.5}
    assert check(thin, {"SliceThickness": 5.0}) == Match(
        False, "SliceThickness 5.0 outside [0.5, 1.5]"
    )
    assert check(thin, {"SliceThickness": "1.5"}) == Match(
        True, "SliceThickness 1.5 within [0.5, 1.5]"
    )
    assert check(thin, {"SliceThickness": 1}).matched
    assert check(thin, {"SliceThickness": "10.0"}) == Match(
        False, "SliceThickness 10.0 outside [0.5, 1.5]"
    )  # "10.0" > "1.5" as numbers, not as text
    ti = {"field": "InversionTime", "min": 1500}
    assert check(ti, {"InversionTime": 2500.0}) == Match(True, "InversionTime 2500.0 >= 1500.0")
    assert check(ti, {"InversionTime": "900"}) == Match(False, "InversionTime 900.0 < 1500.0")
    assert check({"field": "EchoTime", "max": 10}, {"EchoTime": 98}) == Match(
        False, "EchoTime 98.0 > 10.0"
    )


def test_range_does_not_match_non_numbers() -> None:
    thin = {"field": "SliceThickness", "min": 0.5}
    assert check(thin, {"SliceThickness": "thin"}) == Match(
        False, "SliceThickness 'thin' is not a number"
    )
    assert not check(thin, {"SliceThickness": [1.0, 2.0]}).matched
    assert not check(thin, {"SliceThickness": "nan"}).matched
    assert check(thin, {"SliceThickness": [1.0]}).matched


@pytest.mark.parametrize("missing", [None, "", "  ", [], ["", ""]])
def test_present(missing: object) -> None:
    agent = "ContrastBolusAgent"
    assert check({"field": agent, "present": True}, {agent: "GADOVIST"}) == Match(
        True, "ContrastBolusAgent 'GADOVIST' returned by the PACS"
    )
    assert not check({"field": agent, "present": False}, {agent: "GADOVIST"}).matched
    assert check({"field": agent, "present": False}, {agent: missing}) == Match(
        True, "ContrastBolusAgent not returned by the PACS"
    )
    assert not check({"field": agent, "present": True}, {agent: missing}).matched
    assert check({"field": agent, "present": False}, {}).matched


@pytest.mark.parametrize(
    "data",
    [
        {"field": "MRAcquisitionType", "regex": "."},
        {"field": "MRAcquisitionType", "equals": "3D"},
        {"field": "MRAcquisitionType", "in": ["3D"]},
        {"field": "MRAcquisitionType", "contains": "3D"},
        {"field": "MRAcquisitionType", "min": 0},
    ],
)
@pytest.mark.parametrize("missing", [None, "", []])
def test_a_leaf_on_a_missing_value_does_not_match(data: object, missing: object) -> None:
    expected = Match(False, "MRAcquisitionType not returned by the PACS")
    assert check(data, {"MRAcquisitionType": missing}) == expected
    assert check(data, {}) == expected


# --- combinators -------------------------------------------------------------------------------

T1_3D = {
    "all": [
        {"field": "MRAcquisitionType", "equals": "3D"},
        {"field": "SeriesDescription", "regex": "(?i)mprage"},
    ]
}


def test_all_explains_the_first_failure_or_every_match() -> None:
    attrs = {"MRAcquisitionType": "3D", "SeriesDescription": "t1_mprage_sag"}
    assert check(T1_3D, attrs) == Match(
        True, "MRAcquisitionType is '3D' and SeriesDescription 't1_mprage_sag' matches /(?i)mprage/"
    )
    assert check(T1_3D, {**attrs, "MRAcquisitionType": "2D"}) == Match(
        False, "MRAcquisitionType '2D' is not '3D'"
    )
    assert check(T1_3D, {"SeriesDescription": "t1_mprage_sag"}) == Match(
        False, "MRAcquisitionType not returned by the PACS"
    )


def test_any_explains_the_first_match_or_every_failure() -> None:
    data = {"any": [{"field": "Modality", "equals": "MR"}, {"field": "Modality", "equals": "OT"}]}
    assert check(data, {"Modality": "OT"}) == Match(True, "Modality is 'OT'")
    assert check(data, {"Modality": "CT"}) == Match(
        False, "none of: Modality 'CT' is not 'MR'; Modality 'CT' is not 'OT'"
    )


def test_not_inverts_and_keeps_the_deciding_fact() -> None:
    data = {"not": {"field": "Modality", "equals": "MR"}}
    assert check(data, {"Modality": "OT"}) == Match(True, "Modality 'OT' is not 'MR'")
    assert check(data, {"Modality": "MR"}) == Match(False, "Modality is 'MR'")
    assert check(data, {}).matched  # a missing Modality is not MR


def test_fields_lists_every_keyword_read() -> None:
    data = {"any": [T1_3D, {"not": {"field": "ImageType", "contains": "DERIVED"}}]}
    assert rule(data).fields() == {"MRAcquisitionType", "SeriesDescription", "ImageType"}


def test_rules_are_frozen() -> None:
    leaf = rule({"field": "Modality", "equals": "MR"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        leaf.field = "ImageType"  # type: ignore[attr-defined]


# --- rule validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("MR", "r: a rule must be a mapping"),
        ({"field": "Modality", "regx": "MR"}, "r.regx: unknown rule key (did you mean 'regex'?)"),
        ({"field": "Modality", "regex": "M", "equals": "MR"}, "r: 2 rule kinds (regex, equals)"),
        ({"field": "Modality"}, "r: no rule kind"),
        (
            {"field": "EchoTime", "regex": "1", "min": 1, "max": 2},
            "r: 2 rule kinds (regex, min/max)",
        ),
        ({"field": "Modality", "regex": "(MR"}, "r.regex: invalid regular expression '(MR'"),
        (
            {"field": "SeriesDescripton", "regex": "x"},
            "r.field: 'SeriesDescripton' is not a DICOM keyword "
            "(did you mean 'SeriesDescription'?)",
        ),
        ({"regex": "x"}, "r.field: give the DICOM keyword"),
        (
            {"field": "SliceThickness", "min": 3, "max": 1},
            "r: min 3.0 is greater than max 1.0; swap them",
        ),
        ({"field": "SliceThickness", "min": "thin"}, "r.min: give a number"),
        ({"field": "SliceThickness", "max": None}, "r.max: give a number"),
        ({"field": "Modality", "present": "yes"}, "r.present: write present: true"),
        ({"field": "Modality", "in": "MR"}, "r.in: give a non-empty list"),
        ({"field": "Modality", "equals": ""}, "r.equals: give one non-empty value"),
        ({"all": []}, "r.all: give a non-empty list of rules"),
        ({"any": [{"field": "Modality", "equals": "MR"}, 3]}, "r.any[1]: a rule must be"),
        ({"not": {"field": "Modality", "equal": "MR"}}, "r.not.equal: unknown rule key"),
        ({"field": "Modality", "not": {"field": "Modality", "equals": "MR"}}, "r: 'not' takes no"),
    ],
)
def test_invalid_rules_name_their_location(data: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=f"^{re.escape(message)}"):
        parse_rule(data, "r")


def test_protocol_error_is_a_configuration_error() -> None:
    assert issubclass(ProtocolError, ConfigurationError)


# --- the protocol file -------------------------------------------------------------------------

MINIMAL = """\
version: 1
exclude:
  derived: {field: ImageType, contains: DERIVED}
protocols:
  mini:
    title: Minimal
    study:
      modality: MR
      description: ["*BRAIN*"]
    series:
      include:
        t1: {field: SeriesDescription, regex: "(?i)t1"}
        flair: {field: SeriesDescription, regex: "(?i)flair"}
      require: [t1]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "protocols.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ProtocolError) as info:
        load_protocols(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


def test_minimal_file_loads(tmp_path: Path) -> None:
    protocols = load_protocols(write(tmp_path, MINIMAL))
    assert protocols.version == 1
    assert protocols.source == str(tmp_path / "protocols.yaml")
    mini = protocols.get("mini")
    assert (mini.name, mini.title, mini.require) == ("mini", "Minimal", ("t1",))
    assert mini.study == StudyQuery("MR", ("*BRAIN*",))
    assert [name for name, _ in mini.include] == ["t1", "flair"]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("    series:", "    serie:", "protocols.mini.serie: unknown key (did you mean 'series'?)"),
        ("version: 1", "version: 2", "version: 2 is not supported"),
        ("version: 1", "", "top level: missing 'version'"),
        (
            "require: [t1]",
            "require: [t1_3d]",
            "protocols.mini.series.require: 't1_3d' is not one of the include rules (t1, flair)",
        ),
        ("require: [t1]", "require: []", "protocols.mini.series.require: list the include"),
        (
            'regex: "(?i)t1"',
            'regx: "(?i)t1"',
            "protocols.mini.series.include.t1.regx: unknown rule key (did you mean 'regex'?)",
        ),
        (
            'regex: "(?i)t1"',
            'regex: "(?i)t1", equals: T1',
            "protocols.mini.series.include.t1: 2 rule kinds (regex, equals)",
        ),
        (
            'regex: "(?i)flair"',
            'regex: "(?i)flair["',
            "protocols.mini.series.include.flair.regex: invalid regular expression",
        ),
        (
            "field: ImageType",
            "field: ImageTyp",
            "exclude.derived.field: 'ImageTyp' is not a DICOM keyword (did you mean 'ImageType'?)",
        ),
        ('["*BRAIN*"]', '["*BRAIN\\\\*"]', "protocols.mini.study.description[0]: '*BRAIN\\\\*' is"),
        ("modality: MR", "modality: mr", "protocols.mini.study.modality: 'mr' is not a DICOM"),
        ("  mini:", "  mini protocol:", "protocols: 'mini protocol' is not a valid protocol name"),
        (
            "        flair:",
            "        derived:",
            "protocols.mini.series.include.derived: also an exclusion",
        ),
    ],
)
def test_invalid_files_name_file_and_location(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in MINIMAL
    assert load_error(tmp_path, MINIMAL.replace(old, new, 1)).startswith(message)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    broken = MINIMAL.replace('["*BRAIN*"]', '["*BRAIN*"')
    assert load_error(tmp_path, broken).startswith("line 10: invalid YAML")


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    doubled = MINIMAL.replace(
        "      require:", "        t1: {field: Modality, equals: MR}\n      require:"
    )
    assert (
        load_error(tmp_path, doubled) == "line 14: invalid YAML (duplicate key 't1'); fix it there"
    )


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="cannot read the protocol file"):
        load_protocols(tmp_path / "nowhere.yaml")


def test_unknown_protocol_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(
        ProtocolError,
        match=r"unknown protocol 'mnii' \(did you mean 'mini'\?\); "
        "known protocols: mini",
    ):
        load_protocols(write(tmp_path, MINIMAL)).get("mnii")


def test_own_exclusion_replaces_the_shared_one_in_place(tmp_path: Path) -> None:
    own = MINIMAL.replace(
        "      require:",
        "      exclude:\n"
        "        derived: {field: ImageType, contains: SECONDARY}\n"
        "        dwi: {field: SeriesDescription, regex: '(?i)dwi'}\n"
        "      require:",
    )
    mini = load_protocols(write(tmp_path, own)).get("mini")
    assert [name for name, _ in mini.exclude] == ["derived", "dwi"]
    assert mini.classify_series({"ImageType": ["DERIVED"], "SeriesDescription": "t1"}).selected
    assert mini.classify_series({"ImageType": ["SECONDARY"]}).rule == "derived"


def test_study_query_uses_dicom_wildcards_case_insensitively() -> None:
    query = StudyQuery("MR", ("*DEMENTIA*", "MR? BRAIN", "[MS]*"))
    assert query.matches_description("mri head dementia protocol")
    assert query.matches_description("MRI BRAIN  ")
    assert not query.matches_description("MR BRAIN")
    assert query.matches_description("[ms] follow up")
    assert not query.matches_description("MS follow up")  # [ is literal, not a set
    assert not query.matches_description(None)
    assert StudyQuery("MR", ()).matches_description(None)


def test_decisions_explain_themselves(tmp_path: Path) -> None:
    mini = load_protocols(write(tmp_path, MINIMAL)).get("mini")
    t1 = {"SeriesDescription": "T1 3D", "ImageType": ["ORIGINAL"]}
    mpr = {"SeriesDescription": "T1 MPR", "ImageType": ["DERIVED"]}
    dwi = {"SeriesDescription": "DWI", "ImageType": ["ORIGINAL"]}
    assert mini.classify_series(mpr).rule == "derived"
    assert mini.classify_series(mpr).why == "ImageType contains DERIVED"
    assert mini.classify_series(dwi).rule == NO_INCLUDE_RULE
    assert mini.classify_series(dwi).why == (
        "no include rule matched; role dwi by names: SeriesDescription 'DWI' matches "
        "/(?i)dwi|dti|diff|(^|[^a-z])(trace|b\\d{3,4})/ (physics unknown: ScanningSequence "
        "not in the header)"
    )
    study = mini.decide_study([("1", t1), ("2", mpr), ("3", dwi), ("4", t1)])
    assert (study.selected, study.why) == (True, "t1: 2 series")
    assert [uid for uid, d in study.series if d.selected] == ["1", "4"]
    rejected = mini.decide_study([("2", mpr), ("3", dwi)])
    assert (rejected.selected, rejected.why) == (False, "no series matched required rule t1")
    assert mini.series_fields() >= {
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDescription",
        "ProtocolName",
        "Modality",
        "NumberOfSeriesRelatedInstances",
        "ImageType",
    }


# --- the shipped protocols on the synthetic vendors ----------------------------------------------

SHIPPED = load_protocols()
EXPECTED = {
    "dementia": {"t1_3d": "t1_3d", "flair_2d": "flair", "t2_cor_2d": "hippocampus_t2"},
    "ms": {"t1_3d": "t1_3d", "flair_2d": "flair", "t2_2d": "t2", "t1_post": "t1_post"},
    "open": {"t1_3d": "t1_3d", "flair_2d": "flair"},
}
ALL_SCANNERS = (*SCANNERS, *UNKNOWN_SCANNERS)


def pacs_attrs(spec: SeriesSpec, scanner: Scanner, agent: str = "GADOTERATE") -> Attributes:
    """What a series C-FIND returns for a synthetic series."""
    return {
        "SeriesDescription": spec.series_description,
        "ProtocolName": spec.protocol_name,
        "Modality": "OT" if spec.kind == "burned_in_sc" else "MR",
        "ImageType": list(spec.image_type),
        "MRAcquisitionType": spec.acquisition,
        "ScanningSequence": spec.scanning_sequence.split("\\"),
        "SequenceVariant": spec.sequence_variant.split("\\"),
        "SliceThickness": spec.slice_thickness,
        "RepetitionTime": spec.tr,
        "EchoTime": spec.te,
        "InversionTime": spec.ti,
        "FlipAngle": spec.flip,
        "MagneticFieldStrength": scanner.field_strength,
        "ContrastBolusAgent": agent if spec.kind == "t1_post" else "",
    }


def studies(scanner: Scanner, protocol: str) -> list[list[SeriesSpec]]:
    if protocol in ("knee", "spine"):
        return [body_series(scanner, protocol)]
    return [[*brain_series(scanner, protocol, choice), SC_SERIES] for choice in (0, 1)]


def test_shipped_file_loads() -> None:
    assert set(SHIPPED.protocols) == {"dementia", "ms", "open"}
    assert SHIPPED.source.endswith("protocols.yaml")
    for protocol in SHIPPED.protocols.values():
        assert protocol.require == ("t1_3d",)
        assert [name for name, _ in protocol.exclude] == ["localizer", "derived", "not_mr_image"]


@pytest.mark.parametrize("study_protocol", [*EXPECTED, "knee", "spine"])
def test_study_descriptions_select_only_their_protocol(study_protocol: str) -> None:
    for name, protocol in SHIPPED.protocols.items():
        for description in STUDY_DESCRIPTIONS[study_protocol]:
            matches = protocol.study.matches_description(description)
            assert matches == (name == study_protocol), (name, description)


def roles(protocol: Protocol, specs: list[SeriesSpec], scanner: Scanner) -> dict[str, str]:
    """kind -> the rule that decided it, for a study the protocol selects."""
    series = [(str(i), pacs_attrs(spec, scanner)) for i, spec in enumerate(specs)]
    decision = protocol.decide_study(series)
    assert decision.selected, decision.why
    return {spec.kind: d.rule for spec, (_, d) in zip(specs, decision.series, strict=True)}


@pytest.mark.parametrize("scanner", ALL_SCANNERS, ids=lambda s: s.model)
@pytest.mark.parametrize("protocol", list(EXPECTED))
def test_shipped_rules_select_the_expected_series(scanner: Scanner, protocol: str) -> None:
    for specs in studies(scanner, protocol):
        decided = roles(SHIPPED.get(protocol), specs, scanner)
        selected = {
            kind: rule for kind, rule in decided.items() if rule in EXPECTED[protocol].values()
        }
        assert selected == EXPECTED[protocol]
        assert decided["localizer"] == "localizer"
        assert decided["burned_in_sc"] in ("derived", "not_mr_image")
        if "t2_2d" in decided:  # the axial T2 is a role in MS only
            assert decided["t2_2d"] == ("t2" if protocol == "ms" else NO_INCLUDE_RULE)


@pytest.mark.parametrize("scanner", ALL_SCANNERS, ids=lambda s: s.model)
@pytest.mark.parametrize("body", ["knee", "spine"])
def test_shipped_rules_reject_knee_and_spine_series(scanner: Scanner, body: str) -> None:
    for protocol in SHIPPED.protocols.values():
        for specs in studies(scanner, body):
            series = [(str(i), pacs_attrs(spec, scanner)) for i, spec in enumerate(specs)]
            decision = protocol.decide_study(series)
            assert not decision.selected
            assert not any(d.selected for _, d in decision.series), decision.series


@pytest.mark.parametrize("scanner", ALL_SCANNERS, ids=lambda s: s.model)
def test_post_contrast_t1_is_recognized_by_name_alone(scanner: Scanner) -> None:
    ms = SHIPPED.get("ms")
    post = pacs_attrs(t1_3d(scanner, "ms", post_contrast=True), scanner, agent="")
    assert ms.classify_series(post).rule == "t1_post"
    assert SHIPPED.get("open").classify_series(post).rule == NO_INCLUDE_RULE


@pytest.mark.parametrize("scanner", ALL_SCANNERS, ids=lambda s: s.model)
@pytest.mark.parametrize("protocol", list(EXPECTED))
def test_enhanced_multiframe_t1_is_still_t1_3d(scanner: Scanner, protocol: str) -> None:
    attrs = {
        **pacs_attrs(t1_3d(scanner, protocol), scanner),
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "NONE"],
        "ScanningSequence": [],
        "SequenceVariant": [],
        "SliceThickness": None,
        "RepetitionTime": None,
        "EchoTime": None,
        "FlipAngle": None,
        "InversionTime": None,
    }
    assert SHIPPED.get(protocol).classify_series(attrs).rule == "t1_3d"


@pytest.mark.parametrize(
    ("description", "post"),
    [
        ("t1_mprage_sag_p2_iso_post", True),
        ("AX 3D BRAVO +C", True),
        ("T1W_3D_TFE_+C", True),
        ("MPRAGE GD", True),
        ("sag mprage postcontrast", True),
        ("MPRAGE C+", True),
        ("MPRAGE pre contrast", False),
        ("MPRAGE_pre_gad", False),
        ("3D T1 W/O CONTRAST", False),
        ("MPRAGE non-contrast", False),
        ("t1_mprage_posterior_fossa", False),
    ],
)
def test_post_contrast_names(description: str, post: bool) -> None:
    attrs = {
        "SeriesDescription": description,
        "Modality": "MR",
        "ImageType": ["ORIGINAL", "PRIMARY"],
        "MRAcquisitionType": "3D",
        "MagneticFieldStrength": "3",
        "ContrastBolusAgent": "NONE",
    }
    assert SHIPPED.get("ms").classify_series(attrs).rule == ("t1_post" if post else "t1_3d")


@pytest.mark.parametrize(
    ("protocol", "attrs", "rule"),
    [
        ("dementia", {"SeriesDescription": "AAHead_Scout_64ch-head-coil"}, "localizer"),
        ("dementia", {"SeriesDescription": "Sag CUBE FLAIR", "MRAcquisitionType": "3D"}, "flair"),
        ("dementia", {"SeriesDescription": "AX T1 FLAIR", "InversionTime": 860}, NO_INCLUDE_RULE),
        (
            "dementia",
            {"SeriesDescription": "t2_tirm_cor_stir", "InversionTime": 160},
            NO_INCLUDE_RULE,
        ),
        (
            "dementia",
            {"SeriesDescription": "IR", "ScanningSequence": "SE\\IR", "InversionTime": 2800},
            "flair",
        ),
        (
            "dementia",
            {"SeriesDescription": "T2W_TSE_COR", "ScanningSequence": "SE"},
            "hippocampus_t2",
        ),
        ("ms", {"SeriesDescription": "t2_tse_sag", "ScanningSequence": "SE"}, NO_INCLUDE_RULE),
        ("ms", {"SeriesDescription": "AX T2*", "ScanningSequence": "GR"}, NO_INCLUDE_RULE),
        (
            "ms",
            {"SeriesDescription": "t2_fl2d_tra_hemo", "ScanningSequence": "GR"},
            NO_INCLUDE_RULE,
        ),
        ("ms", {"SeriesDescription": "T2 TSE", "ScanningSequence": "SE"}, "t2"),
        ("open", {"SeriesDescription": "sT1W_3D_ISO", "MRAcquisitionType": "3D"}, "t1_3d"),
        ("open", {"SeriesDescription": "t1_mprage", "MRAcquisitionType": "3D"}, "t1_3d"),
        ("open", {"SeriesDescription": "tof_fl3d_tra", "MRAcquisitionType": "3D"}, NO_INCLUDE_RULE),
    ],
)
def test_shipped_rules_on_other_real_world_names(
    protocol: str, attrs: dict[str, object], rule: str
) -> None:
    series = {"Modality": "MR", "ImageType": ["ORIGINAL", "PRIMARY"], **attrs}
    series.setdefault("MRAcquisitionType", "2D")
    series.setdefault("MagneticFieldStrength", 1.5)
    assert SHIPPED.get(protocol).classify_series(series).rule == rule
