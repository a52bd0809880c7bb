# corelab — set-up, demo, tests, benchmarks.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SHARED ?= ../shared/data
# Process-wide settings (Prefect, nipype, logging) live in flows/runtime.py, not here.
# Markers a quick run leaves out: the embedded Prefect server, pipeline runs, containers.
FAST   := not prefect and not pipeline and not containers

.PHONY: setup demo lint services test test-fast test-containers bench lock clean

# pydeface's face template and mask (data only; tasks/bids/deface.py says why), sha256 checked there
FACE   := $(VENV)/share/corelab/pydeface-2.1.0/facemask.nii.gz

setup: $(STAMP) $(FACE)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

$(FACE): | $(STAMP)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps pydeface==2.1.0 -d $(VENV)/wheels
	$(PY) -m tasks.bids.deface $(VENV)/wheels/pydeface-2.1.0-py3-none-any.whl

# The main job end to end on the bundled default: the virtual trial made from the shared real data,
# into a fresh demo-lake/ (the demo's own output: a second run would receive the same subjects again).
demo: setup
	rm -rf demo-lake
	$(VENV)/bin/corelab demo --data $(SHARED) --lake demo-lake

# The architecture (import-linter contracts in pyproject.toml) and a small ruff rule set.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Programs the tests talk to as real peers: dcmtk's storescu/echoscu (Debian package dcmtk) and
# Orthanc playing a site's PACS (Debian package orthanc; the tests run their own Orthanc process);
# and the referee of available-case ComBat, sva's ComBat in R (Debian package r-bioc-sva).
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
services:
	@command -v storescu >/dev/null && command -v echoscu >/dev/null || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y dcmtk; }
	@command -v Orthanc >/dev/null || test -x /usr/sbin/Orthanc || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y orthanc; }
	@command -v chromium >/dev/null || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }
	@Rscript -e 'suppressMessages(library(sva))' >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends r-bioc-sva; }

test: lint services
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

# Unit tests only: no Prefect server, no pipeline runs (under 3 minutes).
test-fast: lint services
	$(PY) -m pytest -q -m "$(FAST)"

# Builds the anatomical image with podman and compares it with the local backend.
test-containers: setup
	$(PY) -m pytest -q -m containers tests/run/test_podman.py tests/run/test_podman_dwi.py tests/run/test_podman_bold.py

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^corelab' > requirements.lock.new
	{ echo '# Exact pins for `make setup` (pip freeze of a working install on Python 3.11).'; \
	  echo '# Regenerate: make lock'; cat requirements.lock.new; } > requirements.lock; rm requirements.lock.new

clean:
	rm -rf $(VENV) demo-lake .pytest_cache
