"""Make what the test suite caches in $COHORTFLOW_TEST_CACHE (the head model, about two and a
half minutes on one core, and the defacing labels) while ``make test`` lints: in a fresh
checkout every test worker waited for the head model first. The suite makes them itself when
they are missing (under the same file lock), so a failure here only costs that time again."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from cohortflow.flows.prefect_env import configure_itk

    configure_itk(1)  # as the suite and the command line do: a reproducible model
    from cohortflow.models.settings import DefaceSettings
    from cohortflow.pipelines.atlas.headmodel import load_or_build
    from cohortflow.pipelines.atlas.template import load_template

    cache = Path(os.environ.get("COHORTFLOW_TEST_CACHE", ".cache/test"))
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_or_build(cache)
    policy = DefaceSettings()
    load_template(cache, policy.brain_margin_mm, policy.face_margin_mm, policy.brow_mm)
    sys.stderr.write(f"test cache ready in {cache} ({time.perf_counter() - started:.0f} s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
