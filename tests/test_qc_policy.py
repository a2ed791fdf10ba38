"""The QC policy in protocols.yaml: loaded, merged per protocol, validated with its place named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.pipelines.select.errors import ProtocolError
from cohortflow.qc.findings import CHECKS, Severity
from cohortflow.qc.metrics import METRICS
from cohortflow.qc.policy import PolicyError, parse_policy

SHIPPED = Path(__file__).parent.parent / "pipelines" / "dicom" / "data" / "protocols.yaml"


def test_every_shipped_protocol_checks_its_3d_t1_image_and_header() -> None:
    protocols = load_protocols()
    for protocol in protocols.protocols.values():
        t1 = protocol.qc.role("t1_3d")
        assert t1.image and "RepetitionTime" in t1.expect
        assert {"snrd_wm", "qi1", "coverage_outside"} <= set(protocol.qc.image)
        assert protocol.qc.severity_of("header.unknown_scanner") is Severity.WARN
        assert protocol.qc.severity_of("header.conformance.EchoTime") is Severity.FAIL
    assert protocols.get("ms").qc.role("t1_post").image is False


def test_a_protocol_changes_only_what_it_names(tmp_path: Path) -> None:
    data = yaml.safe_load(SHIPPED.read_text())
    data["protocols"]["ms"]["qc"] = {
        "image": {"snrd_wm": {"min": 12}},
        "severity": {"image.cnr": "fail"},
    }
    path = tmp_path / "protocols.yaml"
    path.write_text(yaml.safe_dump(data))
    protocols = load_protocols(path)
    ms, dementia = protocols.get("ms").qc, protocols.get("dementia").qc
    assert ms.image["snrd_wm"].min == 12 and dementia.image["snrd_wm"].min == 8
    assert ms.image["qi1"] == dementia.image["qi1"]  # merged, not replaced
    assert ms.severity_of("image.cnr") is Severity.FAIL
    assert dementia.severity_of("image.cnr") is Severity.WARN


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"image": {"snr": {"min": 3}}}, "image: unknown metric 'snr' (did you mean 'snr_wm'?)"),
        (
            {"roles": {"t1_3d": {"expect": {"EchoTim": {"min": 1}}}}},
            "'EchoTim' is not a DICOM keyword (did you mean 'EchoTime'?)",
        ),
        (
            {"severity": {"header.missing_slice": "warn"}},
            "unknown check 'header.missing_slice' (did you mean 'header.missing_slices'?)",
        ),
        ({"image": {"cnr": {"min": 3, "max": 1}}}, "image.cnr: min 3 is above max 1"),
        ({"image": {"cnr": {}}}, "image.cnr: give min, max or both"),
        ({"severity": {"image.snr": "fatal"}}, "severity.image.snr: Input should be"),
        ({"outliers": {"z": -1}}, "outliers.z: Input should be greater than 0"),
    ],
)
def test_invalid_policies_name_the_place(section: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=r"^protocols\.ms\.qc") as info:
        parse_policy({}, section, "protocols.ms.qc")
    assert message in str(info.value)


def test_the_protocol_file_reports_qc_errors_with_file_and_place(tmp_path: Path) -> None:
    data = yaml.safe_load(SHIPPED.read_text())
    data["protocols"]["open"]["qc"] = {"roles": {"hippocampus_t2": {"image": True}}}
    path = tmp_path / "protocols.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProtocolError, match=r"protocols.open.qc.roles.hippocampus_t2: not one"):
        load_protocols(path)
    data = yaml.safe_load(SHIPPED.read_text())
    data["qc"]["image"]["qi"] = {"max": 1}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProtocolError, match=r"protocols.yaml: qc.image: unknown metric 'qi'"):
        load_protocols(path)


def test_every_check_and_metric_is_described() -> None:
    assert all(c.title and c.failed and c.failed != c.title for c in CHECKS.values())
    assert all(what and better for what, better in METRICS.values())


def test_one_registry_for_every_stage_overridable_and_titled(tmp_path: Path) -> None:
    """Conversion's and volumetry's checks are in the one registry: protocols.yaml may set their
    severity (per protocol; unknown ids refused), the stages' findings are judged at it, and the
    dashboard titles their reasons."""
    from cohortflow.pipelines.volumetry.verdict import judge
    from cohortflow.qc.dashboard.queries import reason_title
    from cohortflow.qc.findings import finding, verdict

    data = yaml.safe_load(SHIPPED.read_text())
    data["protocols"]["ms"]["qc"] = {
        "severity": {"volumetry.thick_slices": "fail", "convert.fallback": "ignore"}
    }
    path = tmp_path / "protocols.yaml"
    path.write_text(yaml.safe_dump(data))
    protocols = load_protocols(path)
    # a 2D head measured at its defaults: a warning; the ms protocol makes it a failure
    found = judge(
        icv_ml=1500.0, bpf=0.8, correlation=0.8, means=(0.3, 0.6, 1.0),
        gm_ml=650.0, wm_ml=550.0, slice_mm=5.0, converged=True, edge_change=0.1, on_border=0.0,
    )  # fmt: skip
    assert "volumetry.thick_slices" in {f.check for f in found}
    assert verdict(found).value == "warn"
    assert verdict(protocols.qc_of("ms").judged(found)).value == "fail"
    assert verdict(protocols.qc_of("dementia").judged(found)).value == "warn"
    assert verdict(protocols.qc_of(None).judged(found)).value == "warn"  # no protocol: shared
    fallback = [finding("convert.fallback", "SimpleITK converted it")]
    assert verdict(protocols.qc_of("ms").judged(fallback)).value == "pass"
    assert verdict(protocols.qc_of("dementia").judged(fallback)).value == "warn"
    data["protocols"]["ms"]["qc"] = {"severity": {"volumetry.thick_slice": "fail"}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProtocolError, match=r"did you mean 'volumetry\.thick_slices'"):
        load_protocols(path)
    for code in ("convert.fallback", "volumetry.registration", "image.outlier.cjv"):
        assert reason_title(code) == CHECKS[code.removesuffix(".cjv")].failed
    # a reason is labelled by what failed, not by what a pass means (the dashboard once showed
    # "header.missing_slices - no gap in the slice positions" for a series with a gap)
    assert reason_title("header.missing_slices") == "slices missing: a gap in the slice positions"
