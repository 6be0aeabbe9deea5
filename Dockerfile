# medtune: the pipeline (`medtune <stage>`, `dvc repro`) and Prefect worker/serve processes.
#
#   docker build -t medtune .
#   docker run --rm medtune medtune --help
#   docker run --rm --gpus all -v "$PWD:/app" medtune dvc repro
#
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
FROM ${BASE_IMAGE}

# Build-time only, never stored in the image's environment: local wheel folders (space-separated)
# that pip may use instead of downloading, and a CA bundle for a TLS-intercepting proxy.
ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""

LABEL org.opencontainers.image.title="medtune" \
      org.opencontainers.image.description="Labelled medical scans in; a validated, fine-tuned, gated ONNX classifier out (DVC + Prefect)." \
      org.opencontainers.image.licenses="Apache-2.0"

ENV LANG=C.UTF-8 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# git: DVC needs a git repository. tini: PID 1 that forwards signals and reaps the worker's
# children. Python: the base's own 3.11 if it has one with ensurepip, else Debian's python3.11.
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    pkgs="ca-certificates git tini"; \
    if ! python3.11 -c 'import ensurepip, venv' 2>/dev/null; then pkgs="$pkgs python3.11 python3.11-venv"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    python3.11 -m venv /opt/venv; \
    /opt/venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11), f"medtune needs Python 3.11, the base has {sys.version}"'; \
    # A checkout mounted at /app is owned by the host's user: let git (and so DVC) use it anyway.
    git config --system --add safe.directory '*'; \
    useradd --create-home --uid 1000 --user-group --shell /bin/bash medtune; \
    install -d -o medtune -g medtune /app

# The locked dependencies first: this layer (GBs, mostly torch and CUDA) is rebuilt only when
# requirements.lock changes, not on every source edit. With PIP_FIND_LINKS, the pins those folders
# hold are installed from them offline first: pip would otherwise download an index's copy of the
# very same files (docker/local-wheel-pins.py).
COPY requirements.lock docker/local-wheel-pins.py /tmp/
RUN set -eu; \
    if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi; \
    if [ -n "$PIP_FIND_LINKS" ]; then \
        python /tmp/local-wheel-pins.py /tmp/requirements.lock $PIP_FIND_LINKS > /tmp/local.txt; \
        echo "installing $(wc -l < /tmp/local.txt) locked packages from $PIP_FIND_LINKS"; \
        if [ -s /tmp/local.txt ]; then pip install --no-cache-dir --no-index --no-deps -r /tmp/local.txt; fi; \
    else \
        unset PIP_FIND_LINKS; \
    fi; \
    pip install --no-cache-dir -r /tmp/requirements.lock; \
    rm -f /tmp/requirements.lock /tmp/local-wheel-pins.py /tmp/local.txt

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
