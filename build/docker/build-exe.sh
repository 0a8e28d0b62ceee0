#!/usr/bin/env bash
# The aarch64 step of build/dist.sh (`make dist ARCH=arm64`):
#   build/docker/build-exe.sh OUT_DIR VERSION PRODUCT_CONFIG  -> OUT_DIR/elkeid-agent
exec "$(dirname "$0")/../arm64.sh" exe "$@"
