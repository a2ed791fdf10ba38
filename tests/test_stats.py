"""The group and longitudinal statistics against models with known answers: the estimates,
intervals and corrected p values equal statsmodels' own fit of the same data written as a
formula; a planted annual atrophy is recovered; conflicting clinical labels are reported and,
when asked, skipped."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from PIL import Image
from statsmodels.stats.multitest import multipletests
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from cohortflow.flows.cli import main
from cohortflow.models.errors import ExportError
from cohortflow.models.export import (
    LabelConflict,
    read_labels,
)
from cohortflow.models.synth import Fault, PatientTruth, StudyTruth
from cohortflow.pipelines.export.errors import StatsError
from cohortflow.pipelines.export.stats import compare, longitudinal, parse_covariates
from cohortflow.pipelines.synth.cohort import write_labels

#: the planted group differences of BPF and annual changes (fractions of the baseline)
BPF_SHIFT = {"control": 0.0, "dementia": -0.025, "mci": -0.01}
ANNUAL = {"control": -0.005, "dementia": -0.015}


def _volumes(icv: float, bpf: float, rng: np.random.Generator) -> dict[str, float]:
    brain = bpf * icv
    gm = brain * float(rng.normal(0.55, 0.01))
    return {
        "icv_ml": icv,
        "gm_ml": gm,
        "wm_ml": brain - gm,
        "csf_ml": icv - brain,
        "brain_ml": brain,
        "bpf": bpf,
    }


def _cross_sectional(seed: int = 7, n: int = 60) -> list[dict[str, Any]]:
    """Three groups; BPF falls with age and by group; a few rows lack age or sex."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        group = ("control", "dementia", "mci")[i % 3]
        age = int(rng.integers(58, 88))
        sex = "F" if rng.random() < 0.5 else "M"
        icv = float(rng.normal(1500, 130)) * (1.08 if sex == "M" else 1.0)
        bpf = 0.80 - 0.002 * (age - 70) + BPF_SHIFT[group] + float(rng.normal(0, 0.012))
        rows.append(
            {
                "pseudonym": f"PSEUDO{i:03d}",
                "study": f"2.25.{i}",
                "years_since_baseline": 0.0,
                "age": None if i in (4, 11, 30) else age,
                "sex": "" if i == 17 else sex,
                "usable": i != 25,
                "diagnosis": group,
                **_volumes(icv, bpf, rng),
            }
        )
    return rows


def test_group_models_equal_statsmodels_formula_fits_with_holm_across_biomarkers() -> None:
    rows = _cross_sectional()
    result = compare(rows, "diagnosis")  # icv, age, sex
    assert (result.reference, result.n, result.excluded, result.dropped) == ("control", 55, 1, 4)
    assert result.missing == {"icv": 0, "age": 3, "sex": 1}
    assert any("4 row(s) dropped" in note for note in result.notes)
    complete = pd.DataFrame(
        [r for r in rows if r["usable"] and r["age"] is not None and r["sex"]]
    ).astype({"age": float})
    group = "C(diagnosis, Treatment(reference='control'))"
    names = {"intercept": "Intercept", "icv_ml": "icv_ml", "age": "age", "sex[M]": "C(sex)[T.M]"}
    names |= {f"diagnosis[{g}]": f"{group}[T.{g}]" for g in ("dementia", "mci")}
    expected_p = []
    for b in result.biomarkers:
        icv = "" if b.biomarker in ("icv_ml", "bpf") else " + icv_ml"
        fit = smf.ols(f"{b.biomarker} ~ {group} + age + C(sex){icv}", complete).fit()
        ci = fit.conf_int(0.05)
        assert b.model.n == 55 and b.model.df_resid == pytest.approx(fit.df_resid)
        assert b.model.r_squared == pytest.approx(fit.rsquared, rel=1e-9)
        assert sorted(names[t.term] for t in b.model.terms) == sorted(fit.params.index)
        for t in b.model.terms:
            theirs = names[t.term]
            assert t.estimate == pytest.approx(fit.params[theirs], rel=1e-8, abs=1e-12)
            assert t.se == pytest.approx(fit.bse[theirs], rel=1e-8)
            assert t.p == pytest.approx(fit.pvalues[theirs], rel=1e-6, abs=1e-300)
            assert (t.ci_low, t.ci_high) == pytest.approx(tuple(ci.loc[theirs]), rel=1e-8)
        for c in b.contrasts:
            term = f"{group}[T.{c.group}]"
            assert (c.estimate, c.ci_low, c.ci_high) == pytest.approx(
                (fit.params[term], *ci.loc[term]), rel=1e-8
            )
            expected_p.append(fit.pvalues[term])
    holm = multipletests(expected_p, alpha=0.05, method="holm")[1]
    ours = [c.p_holm for b in result.biomarkers for c in b.contrasts]
    assert len(ours) == 12 and ours == pytest.approx(list(holm), rel=1e-6, abs=1e-300)
    bpf = next(b for b in result.biomarkers if b.biomarker == "bpf")
    by_group = {c.group: c for c in bpf.contrasts}
    for g in ("dementia", "mci"):  # the planted shifts inside their intervals
        assert by_group[g].ci_low < BPF_SHIFT[g] < by_group[g].ci_high
    assert by_group["dementia"].p_holm < 0.001


def test_covariates_are_selectable_and_one_row_per_patient_by_default() -> None:
    rows = _cross_sectional()
    assert parse_covariates("icv, sex") == ("icv", "sex")
    assert parse_covariates("none") == () == parse_covariates("")
    with pytest.raises(StatsError, match="unknown covariate height"):
        parse_covariates("icv,height")
    plain = compare(rows, "diagnosis", covariates=())
    assert plain.dropped == 0 and plain.n == 59  # no covariate: no row lacks one
    brain = next(b for b in plain.biomarkers if b.biomarker == "brain_ml")
    assert brain.model.formula == "brain_ml ~ diagnosis" and not brain.adjusted
    # a later study of a patient is a repeated measure: set aside unless asked for
    later = dict(rows[0], study="2.25.later", years_since_baseline=1.5)
    again = compare([later, *rows], "diagnosis", covariates=())
    assert (again.later_studies, again.n) == (1, 59)
    assert compare([later, *rows], "diagnosis", covariates=(), every_study=True).n == 60
    # a covariate that does not vary is left out, with a note
    women = [dict(r, sex="F") for r in rows]
    result = compare(women, "diagnosis", covariates=("sex",))
    assert result.covariates == () and "sex does not vary" in result.notes[0]


def _visits(seed: int = 11, patients: int = 48) -> list[dict[str, Any]]:
    """Brain volume falling by ANNUAL of each patient's own baseline a year, measured with a
    0.4 % error at one to four visits about a year apart."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(patients):
        group = "dementia" if i % 2 else "control"
        icv = float(rng.normal(1500, 130))
        bpf0 = float(rng.normal(0.80, 0.02))
        years = np.concatenate([[0.0], np.cumsum(rng.uniform(0.7, 1.3, size=i % 4))])
        for k, t in enumerate(years):
            bpf = bpf0 * (1 + ANNUAL[group] * t) * (1 + float(rng.normal(0, 0.004)))
            rows.append(
                {
                    "pseudonym": f"PSEUDO{i:03d}",
                    "study": f"2.25.{i}.{k}",
                    "years_since_baseline": float(t),
                    "age": 70,
                    "sex": "F",
                    "usable": True,
                    "diagnosis": group,
                    **_volumes(icv, bpf, rng),
                }
            )
    return rows


def test_longitudinal_recovers_a_known_annual_atrophy() -> None:
    rows = _visits()
    result = longitudinal(rows, "diagnosis")
    # patients with one study (every fourth) are left out and counted
    assert (result.patients, result.single_study_patients) == (36, 12)
    bpf = next(t for t in result.biomarkers if t.biomarker == "bpf")
    rates = {r.group: r for r in bpf.rates}
    for group, annual in ANNUAL.items():
        rate = rates[group]
        assert rate.percent_ci_low < 100 * annual < rate.percent_ci_high, rate
        assert rate.ci_low < rate.per_year < rate.ci_high < 0
        assert rate.p_holm < 0.001
    difference = bpf.differences[0]
    truth = 0.80 * (ANNUAL["dementia"] - ANNUAL["control"])
    assert difference.ci_low < truth < difference.ci_high < 0
    # the same model written as a formula, fitted by statsmodels on the same rows
    data = pd.DataFrame([r for r in rows if r["pseudonym"] in _followed(rows)])
    group = "C(diagnosis, Treatment(reference='control'))"
    formula = f"bpf ~ years_since_baseline * {group}"
    with warnings.catch_warnings():  # on raw BPF its optimiser wrongly fears the boundary
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = smf.mixedlm(formula, data, groups=data["pseudonym"]).fit(reml=True)
    terms = {t.term: t for t in bpf.model.terms}
    ours = {
        "Intercept": terms["intercept"],
        f"{group}[T.dementia]": terms["diagnosis[dementia]"],
        "years_since_baseline": terms["years"],
        f"years_since_baseline:{group}[T.dementia]": terms["years:diagnosis[dementia]"],
    }
    ci = fit.conf_int(0.05)
    for name, term in ours.items():
        assert term.estimate == pytest.approx(fit.fe_params[name], rel=1e-4, abs=1e-7)
        assert term.se == pytest.approx(fit.bse_fe[name], rel=1e-3)
        assert (term.ci_low, term.ci_high) == pytest.approx(tuple(ci.loc[name]), rel=1e-3)
    assert rates["control"].per_year == pytest.approx(fit.fe_params["years_since_baseline"], 1e-4)
    holm = multipletests([r.p for t in result.biomarkers for r in t.rates], method="holm")[1]
    assert [r.p_holm for t in result.biomarkers for r in t.rates] == pytest.approx(list(holm))
    # without groups: one rate for everyone
    pooled = longitudinal(rows)
    assert [r.group for r in pooled.biomarkers[0].rates] == [None]
    assert pooled.biomarkers[0].differences == []


def _followed(rows: list[dict[str, Any]]) -> set[str]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["pseudonym"]] = counts.get(r["pseudonym"], 0) + 1
    return {p for p, n in counts.items() if n > 1}


def test_longitudinal_refuses_without_patients_followed_or_the_time_column() -> None:
    rows = [r for r in _visits() if r["years_since_baseline"] == 0.0]
    with pytest.raises(StatsError, match="at least two patients with two or more"):
        longitudinal(rows)
    with pytest.raises(StatsError, match=r"no column .years_since_baseline.*export the table"):
        longitudinal([{k: v for k, v in r.items() if k != "years_since_baseline"} for r in rows])


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_cli_stats_on_a_table_print_json_that_parses(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _write_csv(_visits(), tmp_path / "visits.csv")
    plot = tmp_path / "trend.png"
    argv = ["stats", "longitudinal", "--table", str(table), "--by", "diagnosis"]
    assert main([*argv, "--plot", str(plot), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["patients"], report["single_study_patients"]) == (36, 12)
    bpf = next(b for b in report["biomarkers"] if b["biomarker"] == "bpf")
    assert {r["group"] for r in bpf["rates"]} == {"control", "dementia"}
    assert bpf["model"]["method"].startswith("MixedLM")
    assert Image.open(plot).size[0] > 800
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "MixedLM (REML)" in out and "patients with one usable study left out" in out
    table = _write_csv(_cross_sectional(), tmp_path / "groups.csv")
    argv = ["stats", "compare", "--table", str(table), "--by", "diagnosis"]
    assert main([*argv, "--covariates", "icv,age", "--plot", str(plot), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["covariates"] == ["icv", "age"] and report["dropped"] == 3
    brain = next(b for b in report["biomarkers"] if b["biomarker"] == "brain_ml")
    assert {"estimate", "ci_low", "ci_high", "p", "p_holm"} <= set(brain["contrasts"][0])
    assert [t["term"] for t in brain["model"]["terms"]][-2:] == ["icv_ml", "age"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Holm" in out and "OLS: brain_ml ~ diagnosis + icv_ml + age" in out
    # usage errors
    assert main([*argv, "--covariates", "height"]) == 2
    assert main([*argv, "--covariates", "icv", "--adjust", "icv"]) == 2
    assert main([*argv, "--by", "nothing", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["kind"] == "usage"


# --- clinical labels ------------------------------------------------------------------------


def test_conflicting_label_lines_are_named_and_skipped_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(
        "accession_number,diagnosis\n"
        "A1,dementia\nA2,control\nA1,control\nA3,mci\nA3,mci\nA4,control\nA4,dementia\n"
    )
    with pytest.raises(ExportError, match=r"line 4: the accession number of line 2 again") as e:
        read_labels(path)
    assert "1 more accession number(s) so, lines 7, 8" in str(e.value)
    assert "--skip-conflicting-labels" in str(e.value)
    labels = read_labels(path, skip_conflicting=True)
    assert labels.conflicts == (LabelConflict((2, 4)), LabelConflict((7, 8)))
    # neither line of a conflict is believed; a line repeated as it was is no conflict
    assert labels.by_accession == {"A2": {"diagnosis": "control"}, "A3": {"diagnosis": "mci"}}


def test_the_synthetic_labels_file_has_one_line_per_accession_number(tmp_path: Path) -> None:
    """The generator's clinical_labels.csv repeated the accession number of a study planted
    with the duplicate-accession fault, with the other patient's group: one conflicting line
    stopped every export of the demo cohort."""

    def study(accession: str, *faults: Fault) -> StudyTruth:
        return StudyTruth.model_construct(accession_number=accession, faults=list(faults))

    patients = [
        PatientTruth.model_construct(group="control", studies=[study("A1"), study("A2")]),
        PatientTruth.model_construct(
            group="dementia", studies=[study("A3"), study("A1", Fault.DUPLICATE_ACCESSION)]
        ),
    ]
    path = tmp_path / "clinical_labels.csv"
    write_labels(patients, path)
    assert path.read_text().splitlines() == [
        "accession_number,diagnosis",
        "A1,control",
        "A2,control",
        "A3,dementia",
    ]
    assert read_labels(path).conflicts == ()
