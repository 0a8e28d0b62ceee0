#!/usr/bin/env bash
# Install the host tools a make target needs, before the target starts:
#
#   tools/host-tools.sh TARGET...      TARGET: dist | dist-arm64 | test | demo | hot
#
# Checks by command, so it costs nothing when all is there. Missing ones are installed
# with apt-get (as root, Debian or Ubuntu; `apt-get update` once, only when an install
# fails without it). A tool that still is missing gives one line naming it and its
# Debian package, and the script exits 1. Optional tools (podman, runc: the arm64 build
# falls back to a chroot without them) are tried and never fail it.
set -euo pipefail

# command:debian-package; a trailing ? marks an optional one.
dist=(debootstrap:debootstrap flock:util-linux unshare:util-linux mount:mount
    chroot:coreutils sha256sum:coreutils git:git)
dist_arm64=("${dist[@]}" qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support
    file:file "podman:podman?" "runc:runc?")
# The package, upgrade and arm64 tests build both architectures and inspect, lint,
# install and boot the packages.
test_tools=("${dist_arm64[@]}" rpm:rpm rpmbuild:rpm dpkg-deb:dpkg systemd-nspawn:systemd-container
    nsenter:util-linux lintian:lintian rpmlint:rpmlint)
# The demo needs only the project's venv (`make setup`).
demo=()
# `make setup` compiles the hot loop (tools/compile_hot.py): a C compiler and Python's headers.
hot=(gcc:gcc "python3-config:python3-dev?")

[ $# -gt 0 ] || { echo "usage: $0 dist|dist-arm64|test|demo|hot..." >&2; exit 2; }
wanted=()
for target in "$@"; do
    case $target in
        dist) wanted+=("${dist[@]}") ;;
        dist-arm64) wanted+=("${dist_arm64[@]}") ;;
        test) wanted+=("${test_tools[@]}") ;;
        demo) wanted+=("${demo[@]}") ;;
        hot) wanted+=("${hot[@]}") ;;
        *) echo "host-tools: unknown target $target" >&2; exit 2 ;;
    esac
done

# Checked on the caller's PATH: the target's commands run with it.
has() { command -v "$1" >/dev/null 2>&1; }

missing() {
    local pair tool
    for pair in "${wanted[@]}"; do
        tool=${pair%%:*}
        has "$tool" || echo "$pair"
    done
}

packages() { cut -d: -f2 | tr -d '?' | sort -u | tr '\n' ' '; }

updated=0
apt_install() {
    [ "$(id -u)" = 0 ] && has apt-get || return 1
    local apt=(apt-get -y -q -o DPkg::Lock::Timeout=600 install --no-install-recommends "$@")
    echo "host-tools: apt-get install $*" >&2
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null 2>&1 && return 0
    [ "$updated" = 0 ] || return 1
    updated=1
    apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null 2>&1
}

todo=$(missing)
[ -n "$todo" ] || exit 0
required=$(grep -v '?$' <<<"$todo" || true)
optional=$(grep '?$' <<<"$todo" || true)
if [ -n "$required" ] && ! apt_install $(packages <<<"$required"); then
    # One unavailable package must not keep the others out.
    for pkg in $(packages <<<"$required"); do
        apt_install "$pkg" || true
    done
fi
for pkg in $(packages <<<"$optional"); do
    apt_install "$pkg" || echo "host-tools: optional $pkg not installed" >&2
done

status=0
for pair in $(missing); do
    case $pair in *'?') continue ;; esac
    echo "host-tools: ${pair%%:*} is missing: install the package ${pair#*:} (see README.md, Build hosts)" >&2
    status=1
done
exit $status
