"""Group statistics of the biomarker table, in the form a reviewer of a paper expects.

**Cross-sectional** (``compare``). Per group: n, mean and SD of each biomarker. Then one linear
model per biomarker, fitted by ordinary least squares (statsmodels ``OLS``)::

    biomarker ~ group + ICV + age + sex

the group a categorical term against the reference group, the covariates selectable
(``covariates``; sex categorical, age and ICV linear). A group's coefficient is its difference
from the reference at equal covariates, given with its standard error, 95 % confidence interval
and two-sided p value on the model's residual degrees of freedom: the ICV slope is estimated in
the same model, so its uncertainty is counted (a t-test on volumes adjusted beforehand ignores
it). ICV as a covariate is the ANCOVA form of head-size correction (Jack et al., Radiology 1989;
O'Brien et al., NeuroImage 2011). BPF, brain over ICV, is normalised for head size already, and
ICV is the head size: both are modelled without ICV.

The p values are corrected for the number of tests shown (each contrast of each biomarker: with
two groups, the six biomarkers) by Holm's step-down method (Holm, Scand J Stat 1979;
statsmodels ``multipletests``), which controls the family-wise error rate whatever the
correlation between biomarkers (brain volume, GM and BPF are far from independent).

One row per patient: a patient with several studies enters with the first (baseline) one, the
later studies being repeated measures of the same person (``longitudinal`` models them).

**Longitudinal** (``longitudinal``). Patients with two or more usable studies; per biomarker a
linear mixed model (statsmodels ``MixedLM``, REML) with a random intercept per patient::

    biomarker ~ years + group + years:group        (random intercept: patient)

``years`` since the patient's first usable study, the group that of this baseline study. The
slope of ``years`` is the annualised change of the reference group, each other group's is the
sum with its interaction (their difference: the interaction), each with a 95 % Wald interval.
As a percentage: per year of the group's fitted baseline level (its uncertainty left aside).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cohortflow.models.volumes import VOLUME_NAMES
from cohortflow.pipelines.export.errors import StatsError

BIOMARKERS = VOLUME_NAMES
#: covariate -> the table's column
COVARIATES: dict[str, str] = {"icv": "icv_ml", "age": "age", "sex": "sex"}
DEFAULT_COVARIATES = ("icv", "age", "sex")
#: never adjusted for ICV: ICV itself, and BPF (brain over ICV, normalised for head size)
WITHOUT_ICV = ("icv_ml", "bpf")
#: the intervals are 1 - ALPHA
ALPHA = 0.05
CORRECTION = "holm"
#: the table's columns that say whose scan a row is and when
SUBJECT = "pseudonym"
TIME = "years_since_baseline"

Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True)
class GroupStats:
    group: str
    n: int
    mean: float
    sd: float


@dataclass(frozen=True)
class Term:
    """One coefficient of a fitted model."""

    term: str
    estimate: float
    se: float
    #: t (OLS) or z (mixed model)
    statistic: float
    p: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class ModelFit:
    """The model table of one biomarker."""

    formula: str
    method: str
    n: int
    terms: list[Term]
    #: OLS: residual degrees of freedom and R²
    df_resid: float | None = None
    r_squared: float | None = None
    residual_sd: float | None = None
    #: mixed model: patients and the SD of their random intercepts
    patients: int | None = None
    random_intercept_sd: float | None = None
    converged: bool = True


@dataclass(frozen=True)
class Contrast:
    """``group`` against the reference group on one biomarker, at equal covariates."""

    group: str
    reference: str
    #: the model's coefficient: the difference at equal covariates, its SE and 95 % CI
    estimate: float
    se: float
    ci_low: float
    ci_high: float
    t: float
    df: float
    p: float
    #: p corrected over every contrast of every biomarker of the comparison (Holm)
    p_holm: float
    #: the estimate in % of the reference group's mean
    percent: float
    #: descriptive: the raw difference of means, and over the pooled SD (Cohen's d)
    difference: float
    cohens_d: float


@dataclass(frozen=True)
class BiomarkerComparison:
    biomarker: str
    #: the covariates of its model (BPF: never ICV)
    covariates: tuple[str, ...]
    groups: list[GroupStats]
    contrasts: list[Contrast]
    model: ModelFit

    @property
    def adjusted(self) -> bool:
        return bool(self.covariates)


@dataclass(frozen=True)
class Comparison:
    by: str
    reference: str
    #: the covariates asked for, and those in the models (one that does not vary is left out)
    requested: tuple[str, ...]
    covariates: tuple[str, ...]
    correction: str
    biomarkers: list[BiomarkerComparison]
    #: rows in the models
    n: int
    #: rows left out: not usable (QC, review), or without a value of ``by``
    excluded: int
    #: later studies of patients already in by their first one
    later_studies: int
    #: rows without the value of a covariate (a row may lack two), and the rows so dropped
    missing: dict[str, int]
    dropped: int
    #: what a reader of the numbers must know (covariates left out, groups too small...)
    notes: list[str]
    #: the ICV coefficient of each ICV-adjusted biomarker (ml per ml)
    slopes: dict[str, float]
    #: the values adjusted to the covariates' means, per biomarker and group (the plot)
    values: dict[str, dict[str, list[float]]] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("values")
        for item, result in zip(out["biomarkers"], self.biomarkers, strict=True):
            item["adjusted"] = result.adjusted
        return out


def parse_covariates(text: str) -> tuple[str, ...]:
    """``"icv,age,sex"`` as names (``"none"`` or nothing: no covariate)."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in COVARIATES]
    if unknown:
        raise StatsError(
            f"unknown covariate {', '.join(unknown)}: choose among {', '.join(COVARIATES)} "
            "(comma-separated), or none"
        )
    return names


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or _text(value) == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _covariate(row: Mapping[str, Any], name: str) -> float | str | None:
    value = row.get(COVARIATES[name])
    if name == "sex":
        return _text(value) or None
    return _number(value)


def _first_studies(rows: list[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], int]:
    """Each patient's first row (the smallest ``years_since_baseline``; rows without a
    pseudonym are kept as they are), and how many later rows were set aside."""

    def when(row: Mapping[str, Any]) -> float:
        found = _number(row.get(TIME))
        return math.inf if found is None else found

    first: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        who = _text(row.get(SUBJECT))
        if who and (who not in first or when(row) < when(first[who])):
            first[who] = row
    chosen = {id(r) for r in first.values()}
    out = [r for r in rows if id(r) in chosen or not _text(r.get(SUBJECT))]
    return out, len(rows) - len(out)


def _design(
    rows: Sequence[Mapping[str, Any]],
    by: str,
    groups: Sequence[str],
    covariates: Sequence[str],
    sex_levels: Sequence[str],
) -> tuple[Matrix, list[str]]:
    """Intercept, one indicator per non-reference group (``groups[0]`` is the reference),
    the covariates (sex: one indicator per level but the first)."""
    columns: list[list[float]] = [[1.0] * len(rows)]
    names = ["intercept"]
    for g in groups[1:]:
        columns.append([1.0 if _text(r[by]) == g else 0.0 for r in rows])
        names.append(f"{by}[{g}]")
    for c in covariates:
        if c == "sex":
            for level in sex_levels[1:]:
                columns.append([1.0 if _covariate(r, c) == level else 0.0 for r in rows])
                names.append(f"sex[{level}]")
        else:
            columns.append([float(_covariate(r, c) or 0.0) for r in rows])
            names.append(COVARIATES[c])
    return np.column_stack(columns).astype(np.float64), names


def _check_rank(x: Matrix, names: Sequence[str], what: str, remedy: str) -> None:
    if x.shape[0] <= x.shape[1]:
        raise StatsError(
            f"{what}: {x.shape[0]} rows are too few for a model of {x.shape[1]} terms "
            f"({', '.join(names)}); {remedy}"
        )
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise StatsError(f"{what}: the model's terms ({', '.join(names)}) are confounded; {remedy}")


def _formula(name: str, terms: Sequence[str]) -> str:
    return f"{name} ~ {' + '.join(terms)}" if terms else f"{name} ~ 1"


def compare(
    rows: Sequence[Mapping[str, Any]],
    by: str,
    covariates: Sequence[str] = DEFAULT_COVARIATES,
    reference: str | None = None,
    biomarkers: Sequence[str] = BIOMARKERS,
    every_study: bool = False,
) -> Comparison:
    """Compare the usable rows of a biomarker table grouped by column ``by`` (see the module):
    one OLS model per biomarker, ``covariates`` among ``COVARIATES``; with ``every_study``
    each row counts, else each patient's first."""
    from statsmodels.regression.linear_model import OLS
    from statsmodels.stats.multitest import multipletests

    requested = tuple(covariates)
    unknown = [c for c in requested if c not in COVARIATES]
    if unknown:
        raise StatsError(f"unknown covariate {', '.join(unknown)}: one of {', '.join(COVARIATES)}")
    if rows and by not in rows[0]:
        known = ", ".join(k for k in rows[0] if k not in BIOMARKERS)
        raise StatsError(f"no column {by!r} to group by; the table has {known}")
    kept = [r for r in rows if r.get("usable", True) and _text(r.get(by))]
    excluded = len(rows) - len(kept)
    later = 0
    if not every_study:
        kept, later = _first_studies(kept)
    missing = {c: sum(1 for r in kept if _covariate(r, c) is None) for c in requested}
    complete = [r for r in kept if all(_covariate(r, c) is not None for c in requested)]
    dropped = len(kept) - len(complete)
    notes: list[str] = []
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in complete:
        groups.setdefault(_text(r[by]), []).append(r)
    sized = {g: members for g, members in sorted(groups.items()) if len(members) >= 2}
    for g, members in sorted(groups.items()):
        if g not in sized:
            notes.append(f"group {g!r} left out: {len(members)} row, fewer than two")
    if len(sized) < 2:
        counts = ", ".join(f"{g}: {len(m)}" for g, m in sorted(groups.items())) or "none"
        raise StatsError(
            f"grouping by {by!r} needs at least two groups of two usable rows; found {counts}"
            + (f" (after dropping {dropped} row(s) without a covariate)" if dropped else "")
        )
    if reference is None:
        reference = next(iter(sized))
    elif reference not in sized:
        raise StatsError(f"reference group {reference!r} is not among {', '.join(sized)}")
    order = [reference, *(g for g in sized if g != reference)]
    model_rows = [r for g in order for r in sized[g]]
    sex_levels = sorted({str(_covariate(r, "sex")) for r in model_rows})
    used: list[str] = []
    for c in requested:
        seen = {_covariate(r, c) for r in model_rows}
        if len(seen) < 2:
            notes.append(f"{c} does not vary among the rows: left out of the models")
        else:
            used.append(c)
    if "icv" in used and any(b in WITHOUT_ICV for b in biomarkers):
        notes.append(
            "ICV and BPF (brain volume over ICV, normalised for head size) are modelled "
            "without the ICV covariate"
        )
    if dropped:
        lacking = ", ".join(f"{c}: {n}" for c, n in missing.items() if n)
        notes.append(f"{dropped} row(s) dropped for a missing covariate ({lacking})")

    results: list[BiomarkerComparison] = []
    values: dict[str, dict[str, list[float]]] = {}
    slopes: dict[str, float] = {}
    for name in biomarkers:
        terms_of = tuple(c for c in used if not (c == "icv" and name in WITHOUT_ICV))
        x, names = _design(model_rows, by, order, terms_of, sex_levels)
        _check_rank(x, names, name, "choose fewer covariates (--covariates): a group of one sex?")
        y = np.array([float(r[name]) for r in model_rows])
        fit = OLS(y, x).fit()
        ci = fit.conf_int(ALPHA)
        terms = [
            Term(
                names[i],
                float(fit.params[i]),
                float(fit.bse[i]),
                float(fit.tvalues[i]),
                float(fit.pvalues[i]),
                float(ci[i, 0]),
                float(ci[i, 1]),
            )
            for i in range(len(names))
        ]
        model = ModelFit(
            formula=_formula(name, [by, *(COVARIATES[c] for c in terms_of)]),
            method="OLS",
            n=int(fit.nobs),
            terms=terms,
            df_resid=float(fit.df_resid),
            r_squared=float(fit.rsquared),
            residual_sd=math.sqrt(float(fit.scale)),
        )
        if "icv" in terms_of:
            slopes[name] = float(fit.params[names.index("icv_ml")])
        # the plot's values: each row moved to the covariates' means along the fitted slopes
        covariate_cols = range(len(order), x.shape[1])
        shift = sum(
            (fit.params[k] * (x[:, k] - x[:, k].mean()) for k in covariate_cols),
            np.zeros(len(y)),
        )
        adjusted = y - shift
        values[name] = {g: [] for g in order}
        for row, v in zip(model_rows, adjusted, strict=True):
            values[name][_text(row[by])].append(float(v))
        raw = {g: [float(r[name]) for r in sized[g]] for g in order}
        summary = [
            GroupStats(g, len(raw[g]), statistics.fmean(raw[g]), statistics.stdev(raw[g]))
            for g in order
        ]
        ref_mean = statistics.fmean(raw[reference])
        contrasts = []
        for j, g in enumerate(order[1:], start=1):
            v, ref = raw[g], raw[reference]
            n1, n2 = len(v), len(ref)
            pooled = math.sqrt(
                ((n1 - 1) * statistics.variance(v) + (n2 - 1) * statistics.variance(ref))
                / (n1 + n2 - 2)
            )
            diff = statistics.fmean(v) - ref_mean
            term = terms[j]
            contrasts.append(
                Contrast(
                    group=g,
                    reference=reference,
                    estimate=term.estimate,
                    se=term.se,
                    ci_low=term.ci_low,
                    ci_high=term.ci_high,
                    t=term.statistic,
                    df=float(fit.df_resid),
                    p=term.p,
                    p_holm=math.nan,  # below, once every p is known
                    percent=100 * term.estimate / ref_mean,
                    difference=diff,
                    cohens_d=diff / pooled if pooled > 0 else math.nan,
                )
            )
        results.append(BiomarkerComparison(name, terms_of, summary, contrasts, model))
    corrected = iter(_holm([c.p for b in results for c in b.contrasts], multipletests))
    results = [
        replace(b, contrasts=[replace(c, p_holm=next(corrected)) for c in b.contrasts])
        for b in results
    ]
    return Comparison(
        by=by,
        reference=reference,
        requested=requested,
        covariates=tuple(used),
        correction=CORRECTION,
        biomarkers=results,
        n=len(model_rows),
        excluded=excluded,
        later_studies=later,
        missing=missing,
        dropped=dropped,
        notes=notes,
        slopes=slopes,
        values=values,
    )


def _holm(p: Sequence[float], multipletests: Any) -> list[float]:
    if not p:
        return []
    return [float(v) for v in multipletests(list(p), alpha=ALPHA, method=CORRECTION)[1]]


# --- longitudinal --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """The annualised change of one biomarker in one group (or in everyone)."""

    group: str | None
    patients: int
    studies: int
    #: the fitted level at the first study (years = 0)
    baseline: float
    per_year: float
    se: float
    ci_low: float
    ci_high: float
    p: float
    #: p corrected over every rate of every biomarker (Holm)
    p_holm: float
    percent_per_year: float
    percent_ci_low: float
    percent_ci_high: float


@dataclass(frozen=True)
class RateDifference:
    """``group``'s annualised change minus the reference group's (the interaction)."""

    group: str
    reference: str
    difference: float
    se: float
    ci_low: float
    ci_high: float
    p: float
    #: p corrected over every difference of every biomarker (Holm)
    p_holm: float


@dataclass(frozen=True)
class BiomarkerTrend:
    biomarker: str
    rates: list[Rate]
    differences: list[RateDifference]
    model: ModelFit


@dataclass(frozen=True)
class Point:
    patient: str
    group: str | None
    years: float
    value: float


@dataclass(frozen=True)
class Longitudinal:
    by: str | None
    reference: str | None
    correction: str
    biomarkers: list[BiomarkerTrend]
    #: patients with two or more studies in the models, their studies and rows
    patients: int
    studies: int
    rows: int
    #: the longest follow-up (years)
    follow_up_years: float
    #: rows left out: not usable, or without a pseudonym or a time
    excluded_rows: int
    #: patients left out: one study only; no group at their first study (with ``by``)
    single_study_patients: int
    ungrouped_patients: int
    notes: list[str]
    #: the data of each biomarker's model (the plot)
    points: dict[str, list[Point]] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("points")
        return out


def _study(row: Mapping[str, Any]) -> str:
    """The row's study (two T1s of one visit are one study); the row itself without one."""
    return _text(row.get("study")) or f"row {id(row)}"


def _patients(
    rows: Sequence[Mapping[str, Any]], by: str | None
) -> tuple[dict[str, list[Mapping[str, Any]]], int, int, int]:
    """Usable rows by patient, each patient's sorted by time; and the rows, single-study
    patients and ungrouped patients left out."""
    kept = [
        r
        for r in rows
        if r.get("usable", True) and _text(r.get(SUBJECT)) and _number(r.get(TIME)) is not None
    ]
    by_patient: dict[str, list[Mapping[str, Any]]] = {}
    for r in kept:
        by_patient.setdefault(_text(r[SUBJECT]), []).append(r)
    single = ungrouped = 0
    out: dict[str, list[Mapping[str, Any]]] = {}
    for who, members in sorted(by_patient.items()):
        members.sort(key=lambda r: float(_number(r[TIME]) or 0.0))
        studies = {_study(r) for r in members}
        if len(studies) < 2:
            single += 1
        elif by is not None and not _text(members[0].get(by)):
            ungrouped += 1
        else:
            out[who] = members
    return out, len(rows) - len(kept), single, ungrouped


def longitudinal(
    rows: Sequence[Mapping[str, Any]],
    by: str | None = None,
    reference: str | None = None,
    biomarkers: Sequence[str] = BIOMARKERS,
) -> Longitudinal:
    """Annualised change of each biomarker in the patients with two or more usable studies,
    per group of ``by`` at the first study when given (see the module)."""
    from statsmodels.regression.mixed_linear_model import MixedLM
    from statsmodels.stats.multitest import multipletests

    if rows:
        for column in (SUBJECT, TIME, *((by,) if by else ())):
            if column not in rows[0]:
                hint = " (export the table again: older exports lack it)" if column == TIME else ""
                raise StatsError(f"the table has no column {column!r}{hint}")
    patients, excluded_rows, single, ungrouped = _patients(rows, by)
    notes: list[str] = []
    group_of = {who: (_text(m[0].get(by)) if by else "") for who, m in patients.items()}
    members: dict[str, list[str]] = {}
    for who, g in group_of.items():
        members.setdefault(g, []).append(who)
    sized = {g: m for g, m in sorted(members.items()) if len(m) >= 2}
    for g, m in sorted(members.items()):
        if g not in sized:
            notes.append(f"group {g!r} left out: {len(m)} patient with two studies, fewer than two")
    if not sized:
        raise StatsError(
            "a longitudinal model needs at least two patients with two or more usable studies"
            + (f" in a group of {by!r}" if by else "")
            + f"; found {len(patients)}"
        )
    if by:
        if reference is None:
            reference = next(iter(sized))
        elif reference not in sized:
            raise StatsError(f"reference group {reference!r} is not among {', '.join(sized)}")
        order = [reference, *(g for g in sized if g != reference)]
    else:
        order, reference = [""], None
    chosen = [who for g in order for who in sized[g]]
    data = [(who, r) for who in chosen for r in patients[who]]
    first = {who: float(_number(patients[who][0][TIME]) or 0.0) for who in chosen}
    years = np.array([float(_number(r[TIME]) or 0.0) - first[who] for who, r in data])
    in_group = {g: np.array([group_of[who] == g for who, _ in data], dtype=float) for g in order}
    columns = [np.ones(len(data))] + [in_group[g] for g in order[1:]]
    columns += [years] + [years * in_group[g] for g in order[1:]]
    names = ["intercept", *(f"{by}[{g}]" for g in order[1:])]
    names += ["years", *(f"years:{by}[{g}]" for g in order[1:])]
    x = np.column_stack(columns)
    _check_rank(x, names, "the longitudinal model", "are a group's studies all on one day?")
    clusters = np.array([chosen.index(who) for who, _ in data])
    k = len(names)
    slope_at, level_at = names.index("years"), 0

    def combination(*at: int) -> npt.NDArray[np.float64]:
        row = np.zeros((1, k))
        row[0, list(at)] = 1.0
        return row

    trends: list[BiomarkerTrend] = []
    points: dict[str, list[Point]] = {}
    for name in biomarkers:
        y = np.array([float(r[name]) for _, r in data])
        # fitted in units of the biomarker's SD: the optimiser misjudges variances of 1e-5
        # (BPF) as on the boundary; every estimate is equivariant, z and p unchanged
        unit = float(np.std(y)) or 1.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = MixedLM(y / unit, x, groups=clusters).fit(reml=True)
        for w in caught:
            notes.append(f"{name}: {str(w.message).splitlines()[0]}")
        ci = fit.conf_int(ALPHA) * unit
        terms = [
            Term(
                names[i],
                float(fit.fe_params[i]) * unit,
                float(fit.bse_fe[i]) * unit,
                float(fit.tvalues[i]),
                float(fit.pvalues[i]),
                float(ci[i, 0]),
                float(ci[i, 1]),
            )
            for i in range(k)
        ]
        rates = []
        differences = []
        for j, g in enumerate(order):
            extra = () if j == 0 else (j,)
            slope = fit.t_test(combination(slope_at, *((slope_at + j,) if j else ())))
            level = unit * _scalar(fit.t_test(combination(level_at, *extra)).effect)
            low, high = (unit * float(v) for v in np.asarray(slope.conf_int(alpha=ALPHA)).ravel())
            per_year = unit * _scalar(slope.effect)
            studies = {(who, _study(r)) for who, r in data if group_of[who] == g}
            rates.append(
                Rate(
                    group=g if by else None,
                    patients=len(sized[g]),
                    studies=len(studies),
                    baseline=level,
                    per_year=per_year,
                    se=unit * _scalar(slope.sd),
                    ci_low=low,
                    ci_high=high,
                    p=_scalar(slope.pvalue),
                    p_holm=math.nan,
                    percent_per_year=100 * per_year / level,
                    percent_ci_low=100 * min(low / level, high / level),
                    percent_ci_high=100 * max(low / level, high / level),
                )
            )
            if j:
                term = terms[slope_at + j]
                assert reference is not None
                differences.append(
                    RateDifference(
                        g,
                        reference,
                        term.estimate,
                        term.se,
                        term.ci_low,
                        term.ci_high,
                        term.p,
                        math.nan,
                    )
                )
        re_var = _scalar(fit.cov_re) * unit**2
        model = ModelFit(
            formula=f"{name} ~ years"
            + (f" + {by} + years:{by}" if by else "")
            + " + (1 | patient)",
            method="MixedLM (REML), random intercept per patient",
            n=len(y),
            terms=terms,
            residual_sd=math.sqrt(float(fit.scale)) * unit,
            patients=len(chosen),
            random_intercept_sd=math.sqrt(max(re_var, 0.0)),
            converged=bool(fit.converged),
        )
        trends.append(BiomarkerTrend(name, rates, differences, model))
        points[name] = [
            Point(who, group_of[who] or None, float(t), float(v))
            for (who, _), t, v in zip(data, years, y, strict=True)
        ]
    rate_p = iter(_holm([r.p for t in trends for r in t.rates], multipletests))
    diff_p = iter(_holm([d.p for t in trends for d in t.differences], multipletests))
    trends = [
        replace(
            t,
            rates=[replace(r, p_holm=next(rate_p)) for r in t.rates],
            differences=[replace(d, p_holm=next(diff_p)) for d in t.differences],
        )
        for t in trends
    ]
    return Longitudinal(
        by=by,
        reference=reference,
        correction=CORRECTION,
        biomarkers=trends,
        patients=len(chosen),
        studies=len({(who, _study(r)) for who, r in data}),
        rows=len(data),
        follow_up_years=float(years.max()) if len(years) else 0.0,
        excluded_rows=excluded_rows,
        single_study_patients=single,
        ungrouped_patients=ungrouped,
        notes=notes,
        points=points,
    )


def _scalar(value: Any) -> float:
    return float(np.asarray(value).ravel()[0])


# --- plots -------------------------------------------------------------------------------------

LABELS = {
    "icv_ml": "ICV (ml)",
    "gm_ml": "GM (ml)",
    "wm_ml": "WM (ml)",
    "csf_ml": "CSF (ml)",
    "brain_ml": "brain (ml)",
    "bpf": "BPF",
}


def _figure(panels: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    return plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)


def _save(fig: Any, axes: Any, used: int, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def box_plot(comparison: Comparison, path: Path) -> None:
    """One box plot per biomarker (groups side by side, the values adjusted to the covariates'
    means, points over the boxes, each contrast's Holm-corrected p in the title), as PNG."""
    fig, axes = _figure(len(comparison.biomarkers))
    for ax, result in zip(axes.flat, comparison.biomarkers, strict=False):
        groups = list(comparison.values[result.biomarker])
        data = [comparison.values[result.biomarker][g] for g in groups]
        ax.boxplot(data, tick_labels=groups, showfliers=False)
        for i, points in enumerate(data, start=1):
            jitter = [i + 0.08 * ((k * 7919) % 11 - 5) / 5 for k in range(len(points))]
            ax.scatter(jitter, points, s=9, alpha=0.6, color="#444")
        ps = ", ".join(f"{c.group} p(Holm) {_p(c.p_holm)}" for c in result.contrasts)
        adjusted = f" adj. {', '.join(result.covariates)}" if result.covariates else ""
        ax.set_title(
            f"{LABELS.get(result.biomarker, result.biomarker)}{adjusted}\n{ps}", fontsize=9
        )
        ax.tick_params(labelsize=8)
    title = f"by {comparison.by} (reference: {comparison.reference}; n={comparison.n})"
    _save(fig, axes, len(comparison.biomarkers), title, path)


def trajectory_plot(result: Longitudinal, path: Path) -> None:
    """One panel per biomarker: each patient's studies joined by a line over the years since
    the first, coloured by group, and each group's fitted mean change, as PNG."""
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
    groups = [r.group for r in result.biomarkers[0].rates] if result.biomarkers else []
    colour = {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    fig, axes = _figure(len(result.biomarkers))
    end = max(result.follow_up_years, 1e-6)
    for ax, trend in zip(axes.flat, result.biomarkers, strict=False):
        lines: dict[str, list[Point]] = {}
        for p in result.points[trend.biomarker]:
            lines.setdefault(p.patient, []).append(p)
        for track in lines.values():
            ax.plot(
                [p.years for p in track],
                [p.value for p in track],
                color=colour.get(track[0].group, "#444"),
                alpha=0.35,
                linewidth=0.8,
                marker="o",
                markersize=2,
            )
        for rate in trend.rates:
            ax.plot(
                [0, end],
                [rate.baseline, rate.baseline + rate.per_year * end],
                color=colour.get(rate.group, "#000"),
                linewidth=2.2,
                label=f"{rate.group or 'all'}: {rate.percent_per_year:+.2f} %/y",
            )
        ps = ", ".join(f"{r.group or 'all'} p(Holm) {_p(r.p_holm)}" for r in trend.rates)
        ax.set_title(f"{LABELS.get(trend.biomarker, trend.biomarker)}\n{ps}", fontsize=8)
        ax.set_xlabel("years since the first study", fontsize=8)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=8)
    by = f" by {result.by} (reference: {result.reference})" if result.by else ""
    title = f"annualised change{by}; {result.patients} patients, {result.studies} studies"
    _save(fig, axes, len(result.biomarkers), title, path)


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"
