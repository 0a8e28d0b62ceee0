#!/bin/sh
# Entry point inside the arm64 build root, used by the Dockerfile's RUN and by the chroot
# fallback of build/arm64.sh, so both run the shared build the same way:
#
#   in-container.sh SRC_DIR OUT_DIR VERSION PRODUCT_CONFIG
#
# runs build/build-in-root.sh with these arguments, then build/elfcheck.py on the result
# (as build/dist.sh does for amd64), leaving OUT_DIR/elfcheck.txt.
set -eu
# Pip settings (index URL, trusted host...) arrive as a secret rather than build args so
# that an index URL carrying credentials never lands in an image layer or its history.
if [ -r /run/secrets/pipenv ]; then
    set -a
    . /run/secrets/pipenv
    set +a
fi
# staticx has no aarch64 wheel of the pinned version: pip builds it from the sdist, whose
# bootloader must be linked against musl (as upstream's own wheels are), not glibc.
export BOOTLOADER_CC="${BOOTLOADER_CC:-musl-gcc}"
# /opt/elkeid-build is a cache kept between container builds: one venv per machine type,
# so a cache shared with another --platform never hands over a foreign venv.
export BUILD_VENV="${BUILD_VENV:-/opt/elkeid-build/$(uname -m)/venv}"
"$1/build/build-in-root.sh" "$@"
if ! "$BUILD_VENV/bin/python" "$1/build/elfcheck.py" "$2/elkeid-agent" >"$2/elfcheck.txt"; then
    cat "$2/elfcheck.txt" >&2
    exit 1
fi
