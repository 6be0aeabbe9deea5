# medtune: `make demo` runs the whole pipeline on synthetic demo scans; `make test` runs the tests.
# Both create the virtual environment from requirements.lock first if it is missing or stale.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed

# dvc.yaml runs `medtune <stage>`: put the venv first on PATH for every recipe.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test bench lock image clean-demo help

help:
	@echo "make demo   - set up, create synthetic demo scans, dvc add + dvc repro, print where results are"
	@echo "make test   - set up and run the test suite (what CI runs)"
	@echo "make bench  - benchmarks (bench/), printed as ratios"
	@echo "make image  - build the Docker image with buildah and smoke-test it (root, minutes)"
	@echo "make lock   - re-pin requirements.lock from the current venv"

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: setup
	@git rev-parse --git-dir >/dev/null 2>&1 || git init -q
	@test -d .dvc || dvc init -q
	@test -d data/raw || medtune demo-data --out data/raw
	dvc add -q data/raw
	dvc repro
	@echo
	@echo "Done. The demo scans are SYNTHETIC (components/demo_data.py); data version: data/raw.dvc"
	@echo "  model          models/model.onnx  (card: models/model_card.md, lineage: models/lineage.json)"
	@echo "  metrics        reports/metrics.json  (gate: reports/gate.json; dvc metrics show)"
	@echo "  validation     reports/validation.md  (full: reports/validation.json)"
	@echo "  plots          reports/roc.png reports/confusion.png reports/train_curves.png reports/augment_preview.png"
	@echo "                 (dvc plots show writes an HTML page of the same curves)"
	@echo "  try            medtune predict models/model.onnx data/raw/lesion -o predictions.csv"

# pytest exits 5 when it collects no tests: that is not a failure of the suite.
test: setup
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: setup
	$(BIN)/python -m bench

# Not part of `make test`: needs root; installs buildah/debootstrap if missing; ~7 min, ~25 GB disk.
# `make image FULL=1` also runs the demo `dvc repro` inside the image.
image:
	FULL=$(FULL) bash docker/build-buildah.sh

lock:
	{ echo "# Every package pinned, as installed and tested on Python 3.11 / Linux x86_64 (pip freeze)."; \
	  echo "# Install: pip install -r requirements.lock && pip install --no-deps -e ."; \
	  echo "# Regenerate after changing pyproject.toml: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e'; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

clean-demo:
	rm -rf data/raw data/raw.dvc data/manifest.* data/prepared models reports dvc.lock
