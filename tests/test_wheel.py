"""The distribution a hospital installs (issue 24): the wheel is built from the repository's
tracked files, installed into a fresh virtual environment, and runs ``anonymize``, ``qc`` and
``volumetry`` from there on a study of the test cohort, with every data file it needs.

The fresh environment takes the third-party dependencies from this one (a path file naming this
environment's site-packages: nothing is downloaded), and never this checkout's own packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from cohortflow.pipelines.synth.cohort import CohortResult

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def _tracked_copy(target: Path) -> Path:
    """The repository's tracked files (what a clean checkout holds), copied to ``target``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():  # cohortflow/ links to the layers' folders
            (target / name).symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target / name)
    return target


def test_the_wheel_installs_into_a_fresh_environment_and_runs(
    tmp_path: Path, cohort: CohortResult, model_cache: Path
) -> None:
    source = _tracked_copy(tmp_path / "source")
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("cohortflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    # one top-level name, cohortflow: the layers are its subpackages (a generic top-level
    # package, pipelines or models, would collide with any other of that name)
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"cohortflow"}
    # every data file of the packages is in the wheel (a plain install once lacked the
    # de-identification profile, and anonymize, run and deidentify broke)
    data = [
        "cohortflow/" + p.relative_to(source).as_posix()
        for top in ("flows", "models", "pipelines", "qc")
        for p in (source / top).rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc")
    ]
    assert "cohortflow/pipelines/anonymize/data/profile.yaml" in data
    assert not [name for name in data if name not in names]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the dependencies of this environment, by path: its .pth files (this checkout's editable
    # install among them) are not read from there
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "-q",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORTFLOW_", "PYTHONPATH"))}
    env.update(COHORTFLOW_HOME=str(tmp_path / "home"), COHORTFLOW_CACHE_DIR=str(model_cache))
    work = tmp_path / "work"
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(venv / "bin" / "cohortflow"), *args],
            env=env,
            cwd=work,  # not the checkout: nothing of it is on the path
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )

    found = (
        "import importlib.util as u, cohortflow.flows as f, cohortflow.pipelines as p; "
        "print(f.__file__, p.__file__, [n for n in ('flows', 'pipelines', 'qc', 'models') "
        "if u.find_spec(n)])"
    )
    where = subprocess.run(
        [str(python), "-c", found],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT) not in where and purelib in where
    assert where.rstrip().endswith("[]"), where  # no layer by a bare top-level name
    assert run("--version").stdout.startswith("cohortflow ")

    study = next(
        st
        for p in cohort.truth.patients
        for st in p.studies
        if not st.faults and any(se.kind == "t1_3d" and not se.faults for se in st.series)
    )
    anonymized = work / "anonymized"
    done = run("anonymize", str(cohort.out_dir / study.folder), str(anonymized), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["written"] > 0
    done = run("qc", str(anonymized), "--json", "--no-record")
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert json.loads(done.stdout)["series"]
    done = run("volumetry", str(anonymized), "--out", str(work / "volumes"), "--json")
    assert done.returncode in (0, 1), done.stderr[-3000:]
    (result,) = json.loads(done.stdout)["results"]
    assert result["volumes"]["icv_ml"] > 1000
