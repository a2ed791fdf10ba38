from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.prefect_env import configure_itk
from models.synth import SynthConfig
from pipelines.synth.cohort import CohortResult, generate
from pipelines.synth.headmodel import HeadModel, load_or_build

# As the command line does: ITK single-threaded, so registrations are reproducible (this must
# happen before the first registration in the test process).
configure_itk(1)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the head model is cached: $COHORTFLOW_TEST_CACHE (kept between runs) or a temp dir."""
    env = os.environ.get("COHORTFLOW_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def head_model(model_cache: Path) -> HeadModel:
    return load_or_build(model_cache)


@pytest.fixture(scope="session")
def cohort(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, head_model: HeadModel
) -> CohortResult:
    """A 12-study cohort with every fault class planted at least once."""
    _ = head_model
    out = tmp_path_factory.mktemp("cohort")
    return generate(SynthConfig(studies=12, seed=7), out, model_cache, workers=2)
