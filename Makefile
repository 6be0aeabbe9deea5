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

.PHONY: setup demo demo-commit test test-fast lint bench lock image clean-demo help

help:
	@echo "make demo   - set up, create synthetic demo scans, dvc add + dvc repro, commit that run as the baseline"
	@echo "make test   - set up and run the test suite (what CI runs)"
	@echo "make test-fast - the tests not marked slow (no DVC/git workspaces, Prefect servers, Dask clusters, training)"
	@echo "make lint   - ruff: lint and format check (CI runs it before the tests)"
	@echo "make bench  - benchmarks (bench/), printed as ratios"
	@echo "make image  - build the Docker image with buildah and smoke-test it (root, minutes); TARGET=predict: the slim one"
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
	@$(MAKE) --no-print-directory demo-commit
	@echo
	@echo "Done. The demo scans are SYNTHETIC (components/data/demo_data.py); data version: data/raw.dvc"
	@echo "  model          models/model.onnx  (card: models/model_card.md, lineage: models/lineage.json)"
	@echo "  metrics        reports/metrics.json  (dvc metrics show; whole record: reports/evaluation.json, gate: reports/gate.json)"
	@echo "  training       dvclive/  (per-epoch curves; run record: reports/train.json)"
	@echo "  validation     reports/validation.md  (full: reports/validation.json)"
	@echo "  plots          dvc plots show  -> dvc_plots/index.html (ROC, confusion, training curves; renders offline)"
	@echo "                 PNG: reports/roc.png reports/confusion.png reports/augment_preview.png"
	@echo "  compare        HEAD is this run: change train.lr in params.yaml, dvc repro, dvc metrics diff --all, dvc plots diff"
	@echo "  try            medtune predict models/model.onnx data/raw/lesion -o predictions.csv"

# Commit the run just made (data/raw.dvc, dvc.lock, the .gitignore files DVC wrote; dvc.yaml and
# params.yaml as run), so that HEAD is the baseline `dvc metrics diff`, `dvc plots diff` and
# `dvc exp show` compare against. Nothing else is committed (other changes stay as they are),
# except in a repository without commits (the `git init` above), whose first commit takes it all.
# Without a git identity it commits as medtune-demo.
demo-commit:
	@id=; { git var GIT_AUTHOR_IDENT && git var GIT_COMMITTER_IDENT; } >/dev/null 2>&1 \
	  || id="-c user.name=medtune-demo -c user.email=medtune-demo@localhost"; \
	msg="demo: baseline run on the synthetic scans (data/raw.dvc + dvc.lock), for dvc metrics/plots diff and exp show"; \
	if ! git rev-parse -q --verify HEAD >/dev/null; then \
	  git add -A && git $$id commit -q -m "$$msg" && echo "committed the baseline run: $$(git log -1 --format='%h %s')"; \
	else \
	  paths="dvc.yaml params.yaml dvc.lock $$(git ls-files -mo --exclude-standard -- '*.dvc' '*.gitignore')"; \
	  git add -- $$paths && \
	  if git diff --cached --quiet HEAD -- $$paths; then echo "baseline run already committed (HEAD)"; \
	  else git $$id commit -q -m "$$msg" -- $$paths && echo "committed the baseline run: $$(git log -1 --format='%h %s')"; fi; \
	fi

# pytest exits 5 when it collects no tests: that is not a failure of the suite. Test modules run on
# every core (pytest-xdist); a module stays in one process, because its fixtures (a Prefect server,
# a trained workspace) are module-scoped.
test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The unit tests only (pytest marker `slow` deselected): about a minute on 2 cores, for the edit-test loop.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" -n auto --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# ruff: the lint rules and the format in pyproject.toml ([tool.ruff]). `ruff format .` fixes the format.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m bench

# Not part of `make test`: needs root; installs buildah/debootstrap if missing; ~7 min, ~25 GB disk.
# `make image FULL=1` also runs the demo `dvc repro` inside the image.
# `make image TARGET=predict`: the slim image (ONNX Runtime, no torch), smoke-tested by scoring the
# demo model in it; MODEL=<a project after make demo> reuses that model instead of building one.
image:
	TARGET=$(TARGET) FULL=$(FULL) MODEL=$(MODEL) bash docker/build-buildah.sh

lock:
	{ echo "# Every package pinned, as installed and tested on Python 3.11 / Linux x86_64 (pip freeze)."; \
	  echo "# Install: pip install -r requirements.lock && pip install --no-deps -e ."; \
	  echo "# Regenerate after changing pyproject.toml: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e'; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

clean-demo:
	rm -rf data/raw data/raw.dvc data/manifest.* data/prepared models reports dvclive dvc.lock
