# cohortflow: the two README commands are `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
export COHORTFLOW_HOME ?= $(CURDIR)/cohortflow-data
# The synthetic head model is cached here between test runs (built once, about a minute).
export COHORTFLOW_TEST_CACHE ?= $(CURDIR)/.cache/test
# Python keeps the bytecode of what it imports (__pycache__, git-ignored) even where the
# environment says not to (PYTHONDONTWRITEBYTECODE=1 on the machines we test on): without it
# every process compiled each module it imported from source, and a run starts dozens of
# processes (command-line children, Dask workers, Prefect servers, test workers). `import ants`
# took 13 s of processor time from source and 4.5 s from bytecode, `import prefect` 4.8 and 2.5 s.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: setup demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock scripts/setup.sh scripts/debian-packages.txt
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(BIN)/cohortflow demo

lint: setup
	$(BIN)/ruff check cohortflow flows pipelines qc models tests benchmarks scripts
	$(BIN)/mypy

# Three pytest-xdist workers on the machine's two cores, tests distributed by file: with two, a
# sixth of the processor time stood idle (tests waiting on Orthanc, a browser, a Prefect server
# or a child process); the head model and the shared cohorts are made once for all of them
# (tests/conftest.py). A browser check that failed with three was matplotlib drawing two plots
# at once in the dashboard, not the load (qc/dashboard/plots.py).
# The head model the tests share starts being made as lint starts (scripts/warm_test_cache.py)
# and goes on while the first tests run; the tests that need it wait for it (a file lock).
TEST_WORKERS ?= 3
test: setup
	@$(BIN)/python scripts/warm_test_cache.py & warm=$$!; \
	$(MAKE) --no-print-directory lint || { kill $$warm; exit 1; }; \
	$(BIN)/pytest -m "" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --timeout=1800 \
		--durations=25; tested=$$?; \
	wait $$warm || echo "warming the test cache failed: the tests made it themselves"; \
	exit $$tested

test-fast: setup
	$(BIN)/pytest -m "not slow and not integration" --timeout=300

bench: setup
	$(BIN)/python benchmarks/synth.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/retrieve.py
	$(BIN)/python benchmarks/anonymize.py
	$(BIN)/python benchmarks/deface.py
	$(BIN)/python benchmarks/image_qc.py
	$(BIN)/python benchmarks/volumetry.py
	$(BIN)/python benchmarks/end_to_end.py
	$(BIN)/python benchmarks/stats.py
	$(BIN)/python benchmarks/cohort.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache test-artifacts
