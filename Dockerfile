# medtune images, two targets of one Dockerfile:
#
#   docker build -t medtune .                             # the default: the training image
#   docker run --rm --gpus all -v "$PWD:/app" medtune dvc repro
#   docker build --target predict -t medtune:predict .    # slim: predict, trace, verify on ONNX Runtime
#   docker run --rm -v "$PWD:/app" medtune:predict medtune predict models/model.onnx scans/ -o p.csv
#
# The training image runs the pipeline (`medtune <stage>`, `dvc repro`) and the Prefect worker/serve
# processes. The predict image scores scans with an exported model and audits it: no torch, no CUDA.
# Without a Docker engine or registry access, docker/build-buildah.sh builds this same file on a
# local Debian bookworm base (docs/docker.md).

# The base: Docker's official Python 3.11 image on Debian bookworm. It is CUDA-capable as it is:
# the locked torch and onnxruntime-gpu wheels both link against CUDA 13 and bring its runtime,
# cuBLAS and cuDNN as nvidia-* wheels (requirements.lock). The one GPU piece that comes from
# outside is the driver (libcuda.so.1), and the NVIDIA Container Toolkit mounts it in on
# `docker run --gpus all`. An nvidia/cuda runtime image would add a second, unused copy of those
# libraries (GBs), and none of its Ubuntu 24.04 tags ships Python 3.11.
# Any Debian/Ubuntu base works if it has Python 3.11 or an apt package `python3.11` (installed
# below when missing, as on the local bookworm base the buildah script uses).
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# What both images share: git, tini, Python 3.11 with an empty venv, the medtune user.
FROM ${BASE_IMAGE} AS system

ENV LANG=C.UTF-8 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    DO_NOT_TRACK=1

# git: DVC needs a git repository (and trace reads dvc.lock at release tags with `git show`).
# tini: PID 1 that forwards signals and reaps children. Python: the base's own 3.11 if it has one
# with ensurepip, else Debian's python3.11.
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    pkgs="ca-certificates git tini"; \
    if ! python3.11 -c 'import ensurepip, venv' 2>/dev/null; then pkgs="$pkgs python3.11 python3.11-venv"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    # apt's package lists and caches (about 100 MB) are of no use at run time.
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    python3.11 -m venv /opt/venv; \
    /opt/venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11), f"medtune needs Python 3.11, the base has {sys.version}"'; \
    # A checkout mounted at /app is owned by the host's user: let git (and so DVC) use it anyway.
    git config --system --add safe.directory '*'; \
    useradd --create-home --uid 1000 --user-group --shell /bin/bash medtune; \
    install -d -o medtune -g medtune /app

# Installs a lock file into /opt/venv (used by both targets). With PIP_FIND_LINKS, the pins those
# folders hold are installed from them offline first: pip would otherwise download an index's copy
# of the very same files (docker/local-wheel-pins.py).
COPY docker/local-wheel-pins.py docker/install-lock.sh /usr/local/lib/medtune-build/


# ---------------------------------------------------------------------------------------------
# predict: `medtune predict`, `trace` and `verify`, and nothing they do not import
# (requirements-predict.lock: ONNX Runtime's CPU build, numpy, Pillow, pydicom, typer, Jinja2,
# the YAML readers, onnx, DVC). Cannot train, run the pipeline or Prefect, nor `predict --explain`.
FROM system AS predict

# Build-time only, never stored in the image's environment: local wheel folders (space-separated)
# that pip may use instead of downloading, and a CA bundle for a TLS-intercepting proxy.
ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""

LABEL org.opencontainers.image.title="medtune-predict" \
      org.opencontainers.image.description="Scores scans with an exported medtune ONNX model and audits it (medtune predict, trace, verify); ONNX Runtime on the CPU, no torch." \
      org.opencontainers.image.licenses="Apache-2.0"

COPY requirements-predict.lock /tmp/
RUN sh /usr/local/lib/medtune-build/install-lock.sh /tmp/requirements-predict.lock

# The code, installed (not editable): this image is run on a mounted project (models/, registry/,
# data/, .git), never on a mounted checkout, whose code could want packages this image lacks.
# flows/ stays out: it is Prefect's, and Prefect is not here.
COPY pyproject.toml README.md /tmp/src/
COPY components /tmp/src/components
RUN set -eu; \
    if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi; \
    if [ -z "$PIP_FIND_LINKS" ]; then unset PIP_FIND_LINKS; fi; \
    pip install --no-cache-dir --no-deps /tmp/src; \
    rm -rf /tmp/src; \
    medtune predict --help >/dev/null; \
    python -c 'import importlib.util as u, onnxruntime as o; assert o.get_device() == "CPU", o.get_device(); heavy = [m for m in ("torch", "pandas", "sklearn", "scipy", "prefect", "great_expectations", "matplotlib") if u.find_spec(m)]; assert not heavy, heavy'

USER 1000:1000
WORKDIR /app

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["medtune", "predict", "--help"]


# ---------------------------------------------------------------------------------------------
# The training image (the default target: the last stage): the pipeline and the Prefect
# worker/serve processes, on CPU or GPU.
FROM system AS train

ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""

LABEL org.opencontainers.image.title="medtune" \
      org.opencontainers.image.description="Labelled medical scans in; a validated, fine-tuned, gated ONNX classifier out (DVC + Prefect)." \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The locked dependencies first: this layer (GBs, mostly torch and CUDA) is rebuilt only when
# requirements.lock changes, not on every source edit.
COPY requirements.lock /tmp/
RUN sh /usr/local/lib/medtune-build/install-lock.sh /tmp/requirements.lock

# Then the project. Editable, so that a checkout mounted over /app is the code that runs: dvc.yaml
# tracks components/*.py in the workspace, and `medtune <stage>` must execute those same files.
COPY --chown=1000:1000 . /app
RUN set -eu; \
    if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi; \
    if [ -z "$PIP_FIND_LINKS" ]; then unset PIP_FIND_LINKS; fi; \
    pip install --no-cache-dir --no-deps -e /app; \
    medtune --help >/dev/null; \
    chown -R 1000:1000 /app

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 1000:1000
WORKDIR /app

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["medtune", "--help"]
