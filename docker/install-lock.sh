#!/bin/sh
# Install every pin of a lock file into the active venv: the dependency layer of both Dockerfile targets.
#
#   sh install-lock.sh /tmp/requirements.lock
#
# Reads the build arguments as the Dockerfile passes them (empty = not given): PIP_FIND_LINKS, local
# wheel folders whose pins are installed from them offline first (pip would otherwise download an
# index's copy of the very same files; local-wheel-pins.py), and PIP_CERT, a CA bundle for pip.
# Removes the lock afterwards, so no copy of it stays in the layer.
set -eu
lock=$1
here=$(dirname "$0")
if [ -z "${PIP_CERT:-}" ]; then unset PIP_CERT; fi
if [ -n "${PIP_FIND_LINKS:-}" ]; then
    # shellcheck disable=SC2086 # a space-separated list of folders
    python "$here/local-wheel-pins.py" "$lock" $PIP_FIND_LINKS > /tmp/local.txt
    echo "installing $(wc -l < /tmp/local.txt) locked packages from $PIP_FIND_LINKS"
    if [ -s /tmp/local.txt ]; then pip install --no-cache-dir --no-index --no-deps -r /tmp/local.txt; fi
    rm -f /tmp/local.txt
else
    unset PIP_FIND_LINKS
fi
pip install --no-cache-dir -r "$lock"
rm -f "$lock"
