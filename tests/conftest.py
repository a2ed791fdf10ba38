"""Shared fixtures. The suite runs in three pytest-xdist workers (``make test``, tests distributed
by file). What is expensive to make is made once per run for all of them: the head model (a file
lock in :func:`load_or_build`) and the 12-study and dementia cohorts (made by the first worker
that needs them, under a file lock; tests only read them). Figures a test reports
(:func:`figures`) are printed at the end of the run, from the workers too.

(``--dist loadgroup`` would send the cohort's tests to one worker, but with pytest 9.2 it groups
nothing: pytest-xdist issue #1386.)"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from filelock import FileLock

from cohortflow.flows.prefect_env import configure_itk, configure_prefect
from cohortflow.models.synth import DEFAULT_FAULT_RATES, CohortTruth, Fault, SynthConfig
from cohortflow.pipelines.atlas.headmodel import HeadModel, load_or_build
from cohortflow.pipelines.synth.cohort import CohortResult, generate
from tests.ingest_helpers import run_folder

# As the command line does: ITK single-threaded, so registrations are reproducible (this must
# happen before the first registration in the test process).
configure_itk(1)

_FIGURES: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect reported figures (in the controller, from the workers' reports too); with
    $COHORTFLOW_TEST_TIMELINE, append each phase's worker, start and stop to that file (how the
    suite's time is spread over the workers: ``make test`` must stay under 30 minutes)."""
    if report.when == "call":
        _FIGURES.extend(str(v) for k, v in report.user_properties if k == "figures")
    timeline = os.environ.get("COHORTFLOW_TEST_TIMELINE")
    if timeline:
        node = getattr(report, "node", None)
        worker = getattr(getattr(node, "gateway", None), "id", "main")
        with open(timeline, "a", encoding="utf-8") as out:
            out.write(f"{worker}\t{report.start:.1f}\t{report.stop:.1f}\t{report.when}\t")
            out.write(f"{report.nodeid}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """With $COHORTFLOW_TEST_TIMELINE, also append each test's processor seconds (its worker's
    and its reaped child processes', the module fixtures it set up included): where the suite's
    processor time goes, which the two cores bound."""
    timeline = os.environ.get("COHORTFLOW_TEST_TIMELINE")
    if not timeline:
        yield
        return
    before = _processor_seconds()
    yield
    own, children = (a - b for a, b in zip(_processor_seconds(), before, strict=True))
    with open(timeline, "a", encoding="utf-8") as out:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        out.write(f"{worker}\t{own:.1f}\t{children:.1f}\tcpu\t{item.nodeid}\n")


def _processor_seconds() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("figures")
        for text in _FIGURES:
            terminalreporter.write_line(text)


#: The longest test files, started first: with ``--dist loadfile`` a file handed out last runs
#: alone at the end while the other workers idle. xdist hands each worker one file, and the
#: next when two of its tests are left, in this order: worker 1 gets the single-process
#: protocol run (about 13 minutes; it waits first for the head model and the cohort it runs on,
#: and asks for no other file until two of its tests are left), the others the files that need
#: neither (the served dashboard, the hostile corpus and input, the killed anonymizer: in a
#: fresh checkout they run while the head model is made on one core, where a worker used to
#: wait for it), then the Dask run. ``make test`` passes ``--no-loadscope-reorder``, else xdist
#: orders files by their number of tests.
FIRST = (
    "test_protocol_run.py",
    "test_dashboard_served.py",
    "test_hostile_corpus.py",
    "test_anonymize_crash.py",
    "test_hostile_input.py",
    "test_protocol_dask.py",
    "test_pacs_retrieve.py",
    # then the other long files, longest first (seconds in a 2-worker run): what is handed out
    # last is short, and the workers end together (the wheel's 74 s, handed out last, once
    # left the other worker idle for 90 s)
    "test_realdata_heads.py",  # 337
    "test_deface.py",  # 330
    "test_flow.py",  # 255
    "test_volumetry.py",  # 188
    "test_dashboard_viewer.py",  # about 130: one study through the folder commands, Chromium
    "test_qc_cohort.py",  # 108
    "test_anonymize.py",  # 107
    "test_wheel.py",  # 74
    "test_synth.py",  # 70
    "test_qc_image.py",  # 65
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: the order within each file is kept


@pytest.fixture
def figures(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """Report measured figures: printed in the summary of every run, not only on failure."""
    return lambda text: record_property("figures", text.strip("\n"))


@pytest.fixture
def prefect_harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], AbstractContextManager[None]]:
    """A temporary Prefect server with its own home, for ``with prefect_harness():``. It waits
    for the server as long as the command line does (configure_prefect's start-up timeout): next
    to the other test worker, start-up took longer than the harness' default of 30 s."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    configure_prefect(tmp_path)
    from prefect.testing.utilities import prefect_test_harness

    return lambda: prefect_test_harness(server_startup_timeout=None)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the head model is cached: $COHORTFLOW_TEST_CACHE (kept between runs), else a
    folder of this run."""
    env = os.environ.get("COHORTFLOW_TEST_CACHE")
    return Path(env) if env else run_folder(tmp_path_factory) / "model-cache"


@pytest.fixture(scope="session")
def head_model(model_cache: Path) -> HeadModel:
    return load_or_build(model_cache)


@pytest.fixture(scope="session")
def cohort(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, head_model: HeadModel
) -> CohortResult:
    """A 12-study cohort with every fault class planted at least once (read-only: copy what a
    test changes)."""
    _ = head_model
    out = run_folder(tmp_path_factory) / "cohort"
    done = out.with_name("cohort.complete")
    with FileLock(f"{out}.lock"):
        if not done.is_file():
            generate(SynthConfig(studies=12, seed=7), out, model_cache, workers=2, overwrite=True)
            done.touch()
    truth_file = out / "ground_truth.json"
    truth = CohortTruth.model_validate_json(truth_file.read_text())
    return CohortResult(truth=truth, out_dir=out, truth_file=truth_file)


#: the dementia-protocol cohort of the protocol runs (tests/test_protocol_run.py)
DEMENTIA6 = SynthConfig(
    studies=6,
    seed=13,  # 3 controls, 3 with dementia, men and women, 3 clean T1s
    protocol_weights={"dementia": 1.0},
    # the faults a run must get through, at their default rates (the 12-study cohort has every
    # class): with all of them six T1s were all faulty, and none showed a clean T1 measured
    fault_rates={
        f: rate
        for f, rate in DEFAULT_FAULT_RATES.items()
        if f
        not in {
            Fault.ENHANCED_MULTIFRAME,
            Fault.DUPLICATE_SLICES,
            Fault.WRONG_PARAMETERS,
            Fault.MOTION,
            Fault.NOISE,
            Fault.UNKNOWN_SCANNER,
            Fault.DUPLICATE_ACCESSION,
        }
    },
)


@pytest.fixture(scope="session")
def dementia6(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, head_model: HeadModel
) -> CohortResult:
    """Six dementia-protocol studies (men and women, with and without dementia), with the file
    faults, missing slices and a cut-off coverage planted (made once per run for both workers,
    as ``cohort``; read-only). Six, not ten: the two protocol runs over it are the longest
    tests of the suite."""
    _ = head_model
    out = run_folder(tmp_path_factory) / "dementia6"
    done = out.with_name("dementia6.complete")
    with FileLock(f"{out}.lock"):
        if not done.is_file():
            generate(DEMENTIA6, out, model_cache, workers=2, overwrite=True)
            done.touch()
    truth_file = out / "ground_truth.json"
    truth = CohortTruth.model_validate_json(truth_file.read_text())
    return CohortResult(truth=truth, out_dir=out, truth_file=truth_file)


@pytest.fixture(scope="session")
def realdata(model_cache: Path) -> Path:
    """The real corpora, unpacked once into the test cache (tests/realdata.py); the test skips
    with a message saying how to get them where they are absent."""
    from tests.realdata import unpacked

    return unpacked(model_cache)
