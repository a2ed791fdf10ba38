"""Anonymize killed at random points: every published file has its linkage, and the rerun
completes the job with no orphan and no duplicate (issue 21)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from cohortflow.models.database import open_index
from cohortflow.models.schema import Linkage
from cohortflow.pipelines.anonymize.files import STAGING
from tests.ingest_helpers import pydicom_file

PATIENTS = 12
FILES_PER_PATIENT = 40
KILLS = 6


def _source(root: Path) -> int:
    """Small MR files of several patients, each file its own instance."""
    template = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    count = 0
    for patient in range(PATIENTS):
        study, series = generate_uid(), generate_uid()
        folder = root / f"p{patient:02d}"
        folder.mkdir(parents=True)
        for number in range(FILES_PER_PATIENT):
            ds = template.copy()
            ds.PatientID = f"MRN{patient:04d}"
            ds.PatientName = f"CRASH^PATIENT{patient}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = number + 1
            ds.save_as(folder / f"{number:03d}.dcm", enforce_file_format=True)
            count += 1
    return count


def _published(out: Path) -> list[Path]:
    """The files a reader of OUT_DIR sees (the staging folder is the run's own)."""
    if not out.is_dir():
        return []
    return [
        p for p in out.rglob("*") if p.is_file() and STAGING not in p.relative_to(out).parts[:1]
    ]


def _linked(home: Path) -> set[str]:
    index = open_index(f"sqlite:///{home / 'index.sqlite'}")
    try:
        with index.session() as session:
            return set(session.scalars(select(Linkage.pseudonym)))
    finally:
        index.dispose()


@pytest.mark.slow
def test_anonymize_killed_at_random_points_leaves_no_orphan_and_the_rerun_completes(
    tmp_path: Path,
) -> None:
    source, out, home = tmp_path / "in", tmp_path / "out", tmp_path / "home"
    total = _source(source)
    env = {**os.environ, "COHORTFLOW_HOME": str(home)}
    env.pop("COHORTFLOW_CONFIG", None)
    command = [sys.executable, "-m", "cohortflow", "anonymize", str(source), str(out), "--json"]
    rng = random.Random(21)
    killed_with = []
    for _ in range(KILLS):
        # kill when the output tree (staging included) holds a random number of files: before
        # the first, between chunks, mid-chunk; the whole process group, as a crash would
        target = rng.randrange(0, total)
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if sum(len(files) for _, _, files in os.walk(out)) >= target:  # races tolerated
                break
            time.sleep(0.005)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        published = _published(out)
        killed_with.append(len(published))
        # no published file without its patient's linkage, whatever the moment of the kill
        orphans = {p.relative_to(out).parts[0] for p in published} - _linked(home)
        assert not orphans, (target, orphans)
        assert not [p for p in published if p.name.endswith(".part")]
    assert len(set(killed_with)) > 2, killed_with  # the kills fell at different points

    done = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    published = _published(out)
    # every input once, under the pseudonym the linkage holds; nothing left in staging
    assert len(published) == total == len({p.name for p in published})
    assert {p.relative_to(out).parts[0] for p in published} <= _linked(home)
    assert len(_linked(home)) == PATIENTS
    assert not (out / STAGING).exists()
    # the same bytes as a run never interrupted (same key: the same pseudonyms and UIDs)
    clean = tmp_path / "clean"
    again = subprocess.run(
        [*command[:-3], str(source), str(clean), "--json"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p.relative_to(out): p.read_bytes() for p in published} == {
        p.relative_to(clean): p.read_bytes() for p in _published(clean)
    }
