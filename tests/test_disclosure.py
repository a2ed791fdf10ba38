"""Disclosure control of the de-identified layer, replaying the attacks a reviewer made
(models/disclosure.py; README "Disclosure control").

Before: ``cohort count --age 50..50`` said ``suppressed: small`` but ``cohort list`` returned the
one row, ``cohort save`` printed "1 patients", and ``--age 50..`` (9) minus ``--age 51..`` (8)
gave the suppressed count; the same through the dashboard's API.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from cohortflow.flows.cli import main
from cohortflow.models.cohort import IDENTIFIED, CohortFilter, count
from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.disclosure import NOISE_MAX, Disclosure
from cohortflow.models.schema import AuditEntry
from cohortflow.models.settings import load_settings
from cohortflow.models.users import set_account
from cohortflow.pipelines.cohort.configured import CohortSetup, protocol_roles, refresh_configured
from cohortflow.qc.dashboard.app import create_app
from tests.review_helpers import Cohort, build, dashboard_login

PASSWORD = "correct horse battery"


def consistent(shown: int, control: Disclosure) -> set[int]:
    """Every true count an attacker who knows the method (the p-table, the rounding, the floor)
    but not the key cannot rule out for an answer ``shown``."""
    floor = control.round_to * math.ceil(control.min_cell / control.round_to)
    possible = set()
    for n in range(control.min_cell, shown + 2 * NOISE_MAX + control.round_to):
        for d in range(-NOISE_MAX, NOISE_MAX + 1):
            rounded = control.round_to * math.floor((n + d) / control.round_to + 0.5)
            if max(floor, rounded) == shown:
                possible.add(n)
    return possible


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[IndexDB, Cohort]]:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    settings = load_settings(None)
    index = open_index(settings.index)
    cohort = build(index)  # 40 patients, one per year of birth: every age held by one
    with index.session() as session:
        set_account(session, "sam", "researcher", PASSWORD)
    refresh_configured(settings, index)
    yield index, cohort
    index.dispose()


def _ages(index: IndexDB) -> list[int]:
    with index.session() as session:
        result = count(
            session, CohortFilter(), ("age_band",), layer=IDENTIFIED, age_band=1, actor="t"
        )
    return sorted(int(c.key[0].split("-")[0].rstrip("+")) for c in result.cells)


def test_no_count_subtraction_tells_a_suppressed_cell(home: tuple[IndexDB, Cohort]) -> None:
    index, _ = home
    control = CohortSetup.load(load_settings(None)).disclosure
    ages = [a for a in _ages(index) if a < 90]
    pairs = []
    with index.session() as session:
        one = count(session, CohortFilter.parse({"age": f"{ages[10]}..{ages[10]}"}),
                    disclosure=control)  # fmt: skip
        assert one.total.suppressed == "small" and one.total.patients is None
        for age in ages[:25]:
            wider = count(session, CohortFilter.parse({"age": f"{age}.."}), disclosure=control)
            narrower = count(session, CohortFilter.parse({"age": f"{age + 1}.."}),
                             disclosure=control)  # fmt: skip
            exact = count(session, CohortFilter.parse({"age": f"{age}.."}), layer=IDENTIFIED,
                          actor="t")  # fmt: skip
            assert exact.total.patients is not None
            a, b = wider.total.patients, narrower.total.patients
            assert a is not None and b is not None
            # the attacker's view: every pair of true counts the two answers allow
            differences = {x - y for x in consistent(a, control) for y in consistent(b, control)}
            assert 1 in differences and len(differences) >= 5, (age, a, b)
            pairs.append((a, b))
        # the same question again: the same answer, so repeating it averages nothing away
        for _ in range(10):
            again = count(session, CohortFilter.parse({"age": f"{ages[0]}.."}), disclosure=control)
            assert again.total.patients == pairs[0][0]
        # and the true difference of 1 is not what the answers show, pair after pair
    assert sum(1 for a, b in pairs if a - b == 1) == 0  # multiples of 5 never differ by 1


def test_a_reviewer_gets_no_list_or_saved_cohort_of_a_small_cell_on_the_command_line(
    home: tuple[IndexDB, Cohort], capsys: pytest.CaptureFixture[str]
) -> None:
    index, _ = home
    age = [a for a in _ages(index) if a < 90][3]
    one = ["--age", f"{age}..{age}"]
    assert main(["cohort", "count", *one, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["suppressed"] == "small"
    assert main(["cohort", "list", *one, "--json"]) == 2
    err = capsys.readouterr().err
    assert "fewer than 5 patients" in " ".join(err.split()) and "CF" not in err
    assert main(["cohort", "save", "single", *one]) == 2
    assert "fewer than 5 patients" in " ".join(capsys.readouterr().err.split())
    wider = ["--age", f"{age}..{age + 4}"]  # 5 patients or more: listed
    assert main(["cohort", "list", *wider, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) >= 5
    # each de-identified question is audited: who, the filters, what was shown
    with index.session() as session:
        asked = session.scalars(
            select(AuditEntry).where(AuditEntry.action.startswith("cohort.query"))
        ).all()
    assert [a.action for a in asked] == ["cohort.query.count", "cohort.query.list"]
    detail = json.loads(asked[0].detail)
    assert detail["filters"] == {"age": f"{age}..{age}"} and detail["patients"] == "small"


def test_a_reviewer_gets_no_list_or_saved_cohort_of_a_small_cell_from_the_dashboard(
    home: tuple[IndexDB, Cohort],
) -> None:
    index, _ = home
    settings = load_settings(None)
    app = create_app(
        settings,
        index,
        refresh=lambda db: refresh_configured(settings, db),
        protocols=protocol_roles(settings),
        disclosure=CohortSetup.load(settings).disclosure,
    )
    age = [a for a in _ages(index) if a < 90][3]
    with TestClient(app) as client:
        page = dashboard_login(client, "sam", PASSWORD)
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token
        counted = client.get(f"/api/cohorts/count?age={age}..{age}").json()
        assert counted["total"]["suppressed"] == "small" and counted["total"]["patients"] is None
        listed = client.get(f"/api/cohorts/list?age={age}..{age}")
        assert listed.status_code == 400 and "fewer than 5 patients" in listed.json()["detail"]
        saved = client.post(
            "/api/cohorts/save",
            json={"name": "single", "filters": {"age": f"{age}..{age}"}},
            headers={"X-CSRF-Token": token.group(1)},
        )
        assert saved.status_code == 400 and "fewer than 5 patients" in saved.json()["detail"]
        wider = client.get(f"/api/cohorts/count?age={age}..").json()["total"]["patients"]
        narrower = client.get(f"/api/cohorts/count?age={age + 1}..").json()["total"]["patients"]
        assert wider % 5 == 0 and narrower % 5 == 0  # no difference of one to read
    with index.session() as session:
        actors = session.scalars(
            select(AuditEntry.actor).where(AuditEntry.action.startswith("cohort.query"))
        ).all()
    # the three counts; the refused list and save answered nothing
    assert list(actors) == ["sam"] * 3


def test_the_dashboard_refuses_de_identified_counts_without_disclosure_control(
    home: tuple[IndexDB, Cohort],
) -> None:
    index, _ = home
    settings = load_settings(None)
    app = create_app(settings, index, protocols=protocol_roles(settings))
    with TestClient(app) as client:
        dashboard_login(client, "sam", PASSWORD)
        answer = client.get("/api/cohorts/count?sex=F")
        assert answer.status_code == 400 and "disclosure control" in answer.json()["detail"]
