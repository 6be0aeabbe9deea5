#!/usr/bin/env bash
# Build a medtune image with buildah (no Docker daemon, no registry pulls) and smoke-test it.
#
#   sudo docker/build-buildah.sh          # base (once) + the training image + smoke tests
#   sudo TARGET=predict docker/build-buildah.sh   # the slim predict image; scores the demo model in it
#   sudo docker/build-buildah.sh base     # only the local Debian bookworm base image
#   sudo docker/build-buildah.sh smoke    # only the smoke tests, on the image already built
#   sudo FULL=1 docker/build-buildah.sh   # also the demo pipeline (`dvc repro`) on a clone, ~2 min
#
# Why not `docker build`: these machines run no Docker engine and cannot pull base images. So we
# debootstrap a Debian bookworm minbase (its python3 is 3.11, like the real base), commit it as a
# local image and pass it to the project's Dockerfile as BASE_IMAGE. Inside the build, apt reaches
# Debian's packages and pip reaches PyPI through the host network with the host's CA bundle; the
# multi-GB torch/CUDA wheels already on this disk are offered read-only as find-links (/wheels/N).
#
# Overrides (environment): TARGET (train, the default, or predict: the Dockerfile's stage), IMAGE
# (default localhost/medtune:latest, or localhost/medtune:predict), BASE_IMAGE, DEBIAN_MIRROR,
# WHEEL_DIRS (space-separated host folders of wheels; default: the local ones in pip's config),
# HOST_CA, BUILDAH_LAYERS (true to cache each Dockerfile step), KEEP_CONTAINER (1 to keep the
# smoke-test container), FULL (1 to also run the demo pipeline in the training image on a throwaway
# clone of this checkout's HEAD), MODEL (predict: a project folder after `make demo`, holding
# models/model.onnx and the scans in data/raw, to score in the image; default: the demo pipeline is
# run on the host, with this checkout's .venv, on a throwaway clone of HEAD, ~2-8 min).
# Exits non-zero on any failure. Needs root (buildah with vfs storage, debootstrap, apt-get).
set -euo pipefail

MODE=${1:-all}
case "$MODE" in
    all|base|smoke) ;;
    *) echo "usage: $0 [all|base|smoke]  (got '$MODE')" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${TARGET:-train}
case "$TARGET" in
    train) IMAGE=${IMAGE:-localhost/medtune:latest}; LOCK=requirements.lock ;;
    predict) IMAGE=${IMAGE:-localhost/medtune:predict}; LOCK=requirements-predict.lock ;;
    *) echo "TARGET must be train or predict (the Dockerfile's stages); got '$TARGET'" >&2; exit 2 ;;
esac
TRAIN_IMAGE=localhost/medtune:latest
BASE_IMAGE=${BASE_IMAGE:-localhost/medtune-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
# vfs + chroot: works inside an unprivileged-looking sandbox where overlay mounts and user
# namespaces are not available. vfs stores every layer as a full copy: slow, but it works.
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
export BUILDAH_LAYERS=${BUILDAH_LAYERS:-false}

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (buildah with vfs storage and debootstrap need it)"

ensure_tools() {
    local missing=()
    command -v buildah >/dev/null || missing+=(buildah)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]} with apt-get"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
}

image_exists() { buildah images --noheading --format '{{.Name}}:{{.Tag}}' 2>/dev/null | grep -qxF "$1"; }

build_base() {
    if image_exists "$BASE_IMAGE"; then
        log "base image $BASE_IMAGE exists; skipping (buildah rmi $BASE_IMAGE to rebuild)"
        return
    fi
    log "building local base $BASE_IMAGE from Debian bookworm minbase ($DEBIAN_MIRROR)"
    local rootfs c m
    rootfs=$(mktemp -d /var/tmp/medtune-rootfs.XXXXXX)
    debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR"
    # Keep the image small and the build's apt-get fast, like Debian's -slim images (the default
    # python:3.11-slim-bookworm base is one): no documentation but the copyright files, no manual
    # pages, no translations, neither now nor from the Dockerfile's apt-get install.
    cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
    find "$rootfs/usr/share/doc" ! -type d ! -name copyright -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$rootfs"/usr/share/{man,groff,info,locale,lintian}/*
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
    c=$(buildah from scratch)
    m=$(buildah mount "$c")
    cp -a "$rootfs"/. "$m"/
    buildah umount "$c" >/dev/null
    buildah config --env LANG=C.UTF-8 --cmd /bin/bash "$c"
    buildah commit -q "$c" "$BASE_IMAGE" >/dev/null
    buildah rm "$c" >/dev/null
    rm -rf "$rootfs"
}

# Host folders holding wheels that pip here uses instead of downloading them: find-links folders,
# and the files/ folder beside each local (file://) simple index. That is where torch and its
# CUDA wheels lie (several GB that need not be downloaded again).
local_wheel_dirs() {
    if [ -n "${WHEEL_DIRS:-}" ]; then echo "$WHEEL_DIRS"; return; fi
    pip config list 2>/dev/null | python3 -c '
import os, shlex, sys
dirs = []
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    value = value.strip("\x27\"")
    if key.endswith(".find-links"):
        dirs += value.split()
    elif key.endswith(".extra-index-url") or key.endswith(".index-url"):
        for url in value.split():
            if url.startswith("file://"):
                dirs.append(os.path.join(os.path.dirname(url[7:].rstrip("/")), "files"))
seen = []
for d in dirs:
    d = os.path.realpath(d)
    if os.path.isdir(d) and d not in seen:
        seen.append(d)
print(" ".join(seen))
'
}

build_image() {
    [ -f "$ROOT/$LOCK" ] || die "$ROOT/$LOCK is missing: the $TARGET image installs those locked dependencies (pip freeze style name==version lines); create it first (requirements-predict.lock: docker/predict-lock.sh)"
    [ -f "$HOST_CA" ] || die "host CA bundle $HOST_CA not found; set HOST_CA"
    local args=(--pull=never --network host --layers="$BUILDAH_LAYERS"
                --build-arg "BASE_IMAGE=$BASE_IMAGE"
                -v "$HOST_CA:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
    local i=0 links=() d
    for d in $(local_wheel_dirs); do
        args+=(-v "$d:/wheels/$i:ro")
        links+=("/wheels/$i")
        echo "offering wheels from $d as /wheels/$i" >&2
        i=$((i + 1))
    done
    [ ${#links[@]} -eq 0 ] || args+=(--build-arg "PIP_FIND_LINKS=${links[*]}")
    # The training image is the Dockerfile's last stage, what `docker build` builds by default.
    [ "$TARGET" = train ] || args+=(--target "$TARGET")
    log "building $IMAGE (target $TARGET) from $ROOT/Dockerfile"
    local t0=$SECONDS old_id new_id
    old_id=$(buildah images --noheading --no-trunc --format '{{.ID}}' "$IMAGE" 2>/dev/null || true)
    buildah bud "${args[@]}" -f "$ROOT/Dockerfile" -t "$IMAGE" "$ROOT"
    BUILD_SECONDS=$((SECONDS - t0))
    # vfs keeps a full copy per image: drop the previous build of this tag, now untagged.
    new_id=$(buildah images --noheading --no-trunc --format '{{.ID}}' "$IMAGE")
    if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
        buildah rmi "${old_id#sha256:}" >/dev/null 2>&1 || echo "note: could not remove the previous image $old_id" >&2
    fi
}

# Folders and containers to remove on exit (KEEP_CONTAINER=1 keeps the smoke-test container).
TRASH=()
cleanup() {
    local t
    for t in "${TRASH[@]}"; do
        if [ -d "$t" ]; then rm -rf "$t"; else buildah rm "$t" >/dev/null 2>&1 || true; fi
    done
}
trap cleanup EXIT

smoke_test() {
    log "smoke-testing $IMAGE"
    local c entry
    c=$(buildah from --pull=never "$IMAGE")
    [ "${KEEP_CONTAINER:-0}" = 1 ] || TRASH+=("$c")
    # buildah run ignores ENTRYPOINT; prepend it so each check is what `docker run IMAGE cmd` does.
    local entrypoint
    entrypoint=$(buildah inspect --type image "$IMAGE" |
        python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)["OCIv1"]["config"].get("Entrypoint") or []))')
    mapfile -t entry <<<"$entrypoint"
    [ -n "${entry[0]}" ] || entry=()
    # Under `docker run` tini is PID 1; here it is not, and would warn about zombie reaping.
    # `run -v HOST:/app cmd...` mounts a folder, as `docker run -v` does.
    run() {
        local mounts=()
        while [ "${1:-}" = -v ]; do mounts+=(-v "$2"); shift 2; done
        echo "+ $*" >&2
        buildah run -e TINI_SUBREAPER=1 "${mounts[@]}" "$c" -- "${entry[@]}" "$@"
    }
    if [ "$TARGET" = predict ]; then smoke_predict; else smoke_train; fi
}

smoke_train() {
    run id
    local help
    help=$(run medtune --help)
    echo "$help"
    run python -c "import torch, onnxruntime, prefect, dvc, great_expectations; print('imports ok: torch', torch.__version__, 'onnxruntime', onnxruntime.__version__, 'prefect', prefect.__version__)"
    run git --version
    run dvc --version
    if grep -q 'demo-data' <<<"$help"; then
        run medtune demo-data --out /tmp/d --patients 4 --slices 2
        run sh -c 'find /tmp/d -type f | head -n 5; echo "$(find /tmp/d -type f | wc -l) files"'
    else
        echo "medtune has no demo-data command yet; skipped that check" >&2
    fi
    [ "${FULL:-0}" = 1 ] || return 0

    # The way docs/docker.md runs the pipeline: a checkout mounted at /app, owned by uid 1000.
    log "demo pipeline in $IMAGE on a clone of $ROOT (HEAD)"
    local ws t0
    ws=$(mktemp -d /var/tmp/medtune-ws.XXXXXX)
    TRASH+=("$ws")
    git clone -q "$ROOT" "$ws/app"
    chown -R 1000:1000 "$ws/app"
    t0=$SECONDS
    run -v "$ws/app:/app" sh -c \
        'set -e; test -d data/raw || medtune demo-data --out data/raw; dvc add -q data/raw; dvc repro; ls models'
    echo "dvc repro in the image: $((SECONDS - t0))s" >&2
}

# The slim image: only its package set, then the demo model scored, traced and verified in it, on a
# copy of the demo project mounted at /app (uid 1000), as docs/docker.md runs it.
smoke_predict() {
    run id
    run medtune --help >/dev/null
    run python -c '
import importlib.util, dvc, numpy, onnxruntime, PIL, pydicom
heavy = ["torch", "torchvision", "pandas", "sklearn", "scipy", "prefect", "great_expectations", "matplotlib", "flows"]
found = [m for m in heavy if importlib.util.find_spec(m)]
assert not found, f"the slim image holds {found}"
assert onnxruntime.get_device() == "CPU", onnxruntime.get_device()
print("imports ok: onnxruntime", onnxruntime.__version__, "(CPU), numpy", numpy.__version__, "pillow", PIL.__version__,
      "pydicom", pydicom.__version__, "dvc", dvc.__version__, "; none of", " ".join(heavy))'
    run git --version

    local ws
    ws=$(mktemp -d /var/tmp/medtune-predict.XXXXXX)
    TRASH+=("$ws")
    if [ -n "${MODEL:-}" ]; then
        [ -f "$MODEL/models/model.onnx" ] && [ -d "$MODEL/data/raw" ] ||
            die "MODEL=$MODEL holds no models/model.onnx and data/raw; expected a project folder after \`make demo\`"
        log "copying the project $MODEL for the image"
        cp -a "$MODEL" "$ws/app"
    else
        demo_project "$ws/app"
    fi
    chown -R 1000:1000 "$ws/app"
    run -v "$ws/app:/app" medtune predict models/model.onnx data/raw -o predictions.csv
    run -v "$ws/app:/app" sh -c 'medtune trace models/model.onnx > /tmp/trace.txt && head -n 4 /tmp/trace.txt'
    run -v "$ws/app:/app" medtune verify models/model.onnx
    # The image's scores are the host's: the same model and scans through the host's ONNX Runtime.
    local host=$ROOT/.venv/bin/medtune
    if [ -x "$host" ]; then
        (cd "$ws/app" && "$host" predict models/model.onnx data/raw -o "$ws/host.csv")
        python3 "$ROOT/docker/compare-predictions.py" "$ws/app/predictions.csv" "$ws/host.csv"
    else
        python3 "$ROOT/docker/compare-predictions.py" "$ws/app/predictions.csv"
    fi
}

# The demo model, made on the host with this checkout's venv (what `make demo` runs, without its
# commit), on a throwaway clone of HEAD: synthetic DICOM scans, `dvc add`, `dvc repro`.
demo_project() {
    local dest=$1 bin=$ROOT/.venv/bin t0=$SECONDS
    [ -x "$bin/medtune" ] ||
        die "no $bin/medtune to build the demo model with: run \`make setup\`, or set MODEL=<a project folder after make demo>"
    log "building the demo model on the host: demo pipeline on a clone of $ROOT (HEAD) with $bin"
    git clone -q "$ROOT" "$dest"
    (
        cd "$dest"
        export PATH="$bin:$PATH" DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1
        medtune demo-data --out data/raw
        dvc add -q data/raw
        dvc repro -q
    )
    echo "demo model built on the host in $((SECONDS - t0))s" >&2
}

# The image's size beside the training image's (buildah images, uncompressed).
report_sizes() {
    local name size names=("$IMAGE")
    [ "$IMAGE" = "$TRAIN_IMAGE" ] || names+=("$TRAIN_IMAGE")
    for name in "${names[@]}"; do
        size=$(buildah images --noheading --format '{{.Size}}' "$name" 2>/dev/null | head -n 1 || true)
        echo "size of $name: ${size:-not built on this machine}" >&2
    done
}

ensure_tools
if [ "$MODE" = smoke ]; then
    image_exists "$IMAGE" || die "no image $IMAGE yet: run $0 first"
    smoke_test
    report_sizes
    exit 0
fi
build_base
[ "$MODE" = base ] && exit 0
build_image
smoke_test
log "done: $IMAGE built in ${BUILD_SECONDS}s"
report_sizes
