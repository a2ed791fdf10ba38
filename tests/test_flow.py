from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pydicom
import pytest

from cohortflow.flows.prefect_env import configure_prefect
from cohortflow.pipelines.pacs import orthanc
from cohortflow.pipelines.synth.cohort import CohortResult
from tests.ingest_helpers import free_port


@pytest.mark.integration
@pytest.mark.slow
def test_the_demo_prints_the_comparison_the_reasons_and_where_to_look_next(
    tmp_path: Path, model_cache: Path
) -> None:
    """``cohortflow demo`` in a fresh home, as a first-time user runs it (a child process; the
    Prefect server is the test's, so that the run's artifacts can be read afterwards). Seed 29,
    six studies: four clean T1s (two controls, two with dementia) and two planted faults, a T1
    with motion and one with missing slices (the default demo: nine studies, six clean T1s)."""
    from sqlalchemy import select

    from cohortflow.models.database import open_index
    from cohortflow.models.schema import User
    from cohortflow.models.users import account, check_password
    from tests.protocol_helpers import BIN, prefect_server

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORTFLOW_", "PREFECT_"))}
    env.update(COHORTFLOW_HOME=str(home), COHORTFLOW_CACHE_DIR=str(model_cache))
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # four measured patients: the project's smallest cell lowered, as a study this small must
    # (the default, 5 patients, refuses the export: the demo says so and goes on)
    env["COHORTFLOW_COHORT__MIN_CELL_PATIENTS"] = "2"
    for name in ("ORTHANC__HTTP_PORT", "ORTHANC__DICOM_PORT", "RETRIEVE__SCP_PORT"):
        env[f"COHORTFLOW_{name}"] = str(free_port())
    (tmp_path / "prefect").mkdir()
    with prefect_server(tmp_path / "prefect") as served:
        env["PREFECT_API_URL"] = api = served()
        argv = [str(BIN / "cohortflow"), "demo", "--studies", "6", "--seed", "29"]
        shown = subprocess.run(
            argv, check=False, env=env, capture_output=True, text=True, timeout=1500
        )
        assert shown.returncode == 0, shown.stderr[-4000:]
        machine = subprocess.run(
            [argv[0], "status", "dementia", "--json"],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            artifacts = {a.key: a for a in client.read_artifacts()}
    out = " ".join(shown.stdout.split())
    # the success rates with each failure's reason
    status = json.loads(machine.stdout)["protocols"][0]
    assert status["t1_series"] == 6 and status["t1_with_biomarkers"] == 4
    assert (
        sum(status["t1_reasons"].values()) == 2 and "header.missing_slices" in status["t1_reasons"]
    )
    for reason in status["t1_reasons"]:
        assert reason in out
    # dementia against controls: an effect and a p value per biomarker (four patients are too
    # few for a covariate: an ICV-adjusted model would keep one degree of freedom for its error;
    # the demo says what it left out)
    assert "against control, adjusted for nothing" in out and "too few patients per group" in out
    assert "dementia (n=2)" in out and "control (n=2)" in out
    assert "95 % CI" in out and "p Holm" in out
    # where to look next: the export it wrote, the dashboard and an account that signs in
    assert "Where to look next" in out
    export = home / "exports" / "biomarkers-dementia-demo.csv"
    assert str(export) in out
    rows = list(csv.DictReader(export.open()))
    assert len(rows) == 4 and {r["diagnosis"] for r in rows} == {"dementia", "control"}
    password = out.split("with the password ")[1].split()[0]
    index = open_index(f"sqlite:///{home / 'index.sqlite'}")
    with index.session() as session:
        made = account(session, "demo-reviewer")
        stored = session.scalar(select(User.password_hash).where(User.username == made.username))
    index.dispose()
    assert made is not None and made.role == "reviewer" and check_password(password, stored)[0]
    # the run published its outcome for the Prefect UI: a table per stage and a summary
    assert artifacts["outcome-dementia-stages"].type == "table"
    assert "header_qc" in str(artifacts["outcome-dementia-stages"].data)
    assert "T1 series" in str(artifacts["outcome-dementia"].data)
    assert "progress-dementia" in artifacts
    # progress was shown while it ran, and the demo stopped the PACS it started; no process
    # of the run left an ANTs image for the interpreter's teardown (antspyx's bindings said so
    # on stderr as the workers ended)
    assert "studies/h" in shown.stderr and "nanobind: leaked" not in shown.stderr
    assert orthanc.running_pid(home / "orthanc") is None


@pytest.mark.slow
def test_deidentify_flow_anonymizes_and_defaces_into_a_deliverable_folder(
    tmp_path: Path,
    model_cache: Path,
    cohort: CohortResult,
    monkeypatch: pytest.MonkeyPatch,
    prefect_harness: Callable[[], AbstractContextManager[None]],
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COHORTFLOW_CACHE_DIR", str(model_cache))
    from cohortflow.flows.deidentify_flow import deidentify_flow
    from tests.test_anonymize import _found, _planted

    # three studies with a 3D T1 from the shared cohort (made once for the session; every
    # fault class is in it, and anonymize and deface over all of it fail no file)
    source = tmp_path / "source"
    studies = [
        st
        for p in cohort.truth.patients
        for st in p.studies
        if any(se.kind == "t1_3d" for se in st.series)
    ][:3]
    for study in studies:
        shutil.copytree(
            cohort.out_dir / study.folder,
            source / Path(study.folder).relative_to("dicom"),
            copy_function=os.link,
        )
    out = tmp_path / "deliver"
    with prefect_harness():
        anonymized, defaced = deidentify_flow(source=source, out_dir=out)
    assert anonymized.written > 100 and anonymized.failed == 0 and anonymized.patients >= 1
    assert defaced.defaced >= 6 and not defaced.failed
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(p.parts[len(out.parts)].startswith("CF") for p in files)
    values = _planted(cohort.truth)
    assert not [f for f in files if _found(values, f.read_bytes())]
    first = pydicom.dcmread(files[0])
    assert first.PatientIdentityRemoved == "YES" and first.RecognizableVisualFeatures == "NO"
    # what still shows faces stayed on the restricted side
    restricted = tmp_path / "home" / "restricted"
    sheets = list((restricted / "deface-previews" / "deliver").rglob("*_deface.png"))
    # named by the pseudonym of the anonymized header, which PatientID became
    assert sheets and all(p.name.startswith("CF") for p in sheets), sheets
    assert {p.name.split("_", 1)[0] for p in sheets} <= {p.parts[len(out.parts)] for p in files}
    assert any((restricted / "anonymized" / "deliver").rglob("*.dcm"))


def test_prefect_home_is_created_with_its_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: on a fresh clone ./cohortflow-data did not exist and the ephemeral Prefect
    server failed with 'unable to open database file'."""
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    configure_prefect(tmp_path / "not" / "yet")
    assert (tmp_path / "not" / "yet" / "prefect").is_dir()


def test_every_deployment_names_a_flow_and_valid_parameters() -> None:
    """prefect.yaml: one deployment per protocol, each entrypoint importable and its
    parameters accepted by the flow's schema (enforce_parameter_schema is on)."""
    import importlib

    import yaml

    from cohortflow.pipelines.dicom.protocols import load_protocols

    spec = yaml.safe_load((Path(__file__).parent.parent / "prefect.yaml").read_text("utf-8"))
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(load_protocols().protocols) <= set(deployments)
    for name, deployment in deployments.items():
        module, _, attribute = deployment["entrypoint"].partition(":")
        flow = getattr(
            importlib.import_module("cohortflow." + module.removesuffix(".py").replace("/", ".")),
            attribute,
        )
        flow.validate_parameters(deployment.get("parameters", {}))
        assert deployment["enforce_parameter_schema"] is True, name


@pytest.mark.integration
def test_prefect_deploy_creates_every_deployment_on_a_local_server(tmp_path: Path) -> None:
    """`cohortflow prefect setup` (twice: idempotent) then `prefect deploy --all` from the
    repository against a local `prefect server start`: one deployment per protocol, nightly
    and 15 minutes apart in the settings' time zone, with the parameter schema enforced and
    described, the pull step and the `pacs` limit."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    bin_dir = Path(sys.executable).parent
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=api,
        COHORTFLOW_HOME=str(tmp_path / "home"),
        COHORTFLOW_FLOW__TIMEZONE="Europe/Oslo",
    )
    (tmp_path / "prefect").mkdir()
    repo = Path(__file__).parent.parent
    with (tmp_path / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [
                str(bin_dir / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.3)

        def prefect(*args: str) -> str:
            done = subprocess.run(
                [str(bin_dir / "prefect"), *args],
                env=env,
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        def setup() -> dict[str, Any]:
            done = subprocess.run(
                [sys.executable, "-m", "cohortflow", "prefect", "setup", "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            return json.loads(done.stdout)  # type: ignore[no-any-return]

        first, again = setup(), setup()
        assert (first["pool_outcome"], first["limit_outcome"]) == ("created", "created")
        assert (again["pool_outcome"], again["limit_outcome"]) == ("present", "present")
        assert again["timezone"] == "Europe/Oslo" and again["timezone_outcome"] == "present"
        prefect("--no-prompt", "deploy", "--all")
        with urllib.request.urlopen(f"{api}/v2/concurrency_limits/tag:pacs", timeout=30) as got:
            assert json.load(got)["limit"] == 1
        request = urllib.request.Request(
            f"{api}/deployments/filter",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            deployments = {d["name"]: d for d in json.load(answer)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    assert {"dementia", "ms", "open"} <= set(deployments)
    crons = {"dementia": "30 20 * * *", "ms": "45 20 * * *", "open": "0 21 * * *"}
    for name in ("dementia", "ms", "open"):
        deployment = deployments[name]
        assert deployment["enforce_parameter_schema"] is True
        assert deployment["parameters"]["protocol"] == name
        schedules = [s["schedule"] for s in deployment["schedules"]]
        assert [(s["cron"], s["timezone"]) for s in schedules] == [(crons[name], "Europe/Oslo")]
        properties = deployment["parameter_openapi_schema"]["properties"]
        assert "lookback_days" in properties and properties["lookback_days"]["description"]
        # resolved on the worker when a run starts, from the environment the units give it
        assert deployment["pull_steps"] == [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $COHORTFLOW_CODE }}"
                }
            }
        ]


@pytest.mark.slow
def test_the_private_prefect_server_dies_with_a_killed_run(tmp_path: Path) -> None:
    """A run killed with SIGKILL runs no cleanup: its private Prefect server (own session, so
    a Ctrl-C reaches the run first) must still go, not run on for ever."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cohortflow.flows.prefect_env import prefect_api\n"
        "with prefect_api(Path(sys.argv[1])):\n"
        "    print('up', flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    run = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "prefect")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert run.stdout is not None and run.stdout.readline().strip() == "up"
        children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
        assert len(children) == 1
        server = int(children[0])
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:
            # reap it if it became ours (it was the run's child, re-parented)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(server, os.WNOHANG)
            time.sleep(0.2)
        alive = Path(f"/proc/{server}/stat")
        state = alive.read_text().split()[2] if alive.exists() else "gone"
        assert state in ("gone", "Z"), f"the server (pid {server}) outlived the run: {state}"
    finally:
        if run.poll() is None:
            run.kill()
