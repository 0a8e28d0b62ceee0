#!/usr/bin/env bash
# Make a Debian root filesystem once and reuse it: build/mkroot.sh SUITE DIR [ARCH] [INCLUDE,..]
#
# debootstrap --variant=minbase into DIR.partial, then rename: an interrupted run never
# leaves a half-made root that a later run would take as ready. The host's extra CA
# certificates go in because the package proxy here re-signs TLS (pip in the root fails
# without them). Debian packages are cached in build/cache/debs to make re-creation cheap.
set -euo pipefail
suite=$1 dir=$2 arch=${3:-amd64} include=${4:-}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
here=$(cd "$(dirname "$0")" && pwd)
cache=${DEB_CACHE:-$here/cache/debs}

if [ -e "$dir/.ready" ]; then
    exit 0
fi
mkdir -p "$cache" "$(dirname "$dir")"
rm -rf "$dir.partial"
start=$(date +%s)
debootstrap --variant=minbase --arch="$arch" --cache-dir="$cache" \
    ${include:+--include="$include"} "$suite" "$dir.partial" "$mirror" >"$dir.partial.log" 2>&1 || {
    tail -n 30 "$dir.partial.log" >&2
    exit 1
}
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$dir.partial/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$dir.partial/usr/local/share/ca-certificates/"
    if [ -x "$dir.partial/usr/sbin/update-ca-certificates" ]; then
        chroot "$dir.partial" /usr/sbin/update-ca-certificates >/dev/null 2>&1
    fi
fi
# apt inside the root (build-in-root.sh installs its tools with it) needs a resolver.
cp /etc/resolv.conf "$dir.partial/etc/resolv.conf"
touch "$dir.partial/.ready"
rm -rf "$dir"
mv "$dir.partial" "$dir"
mv "$dir.partial.log" "$dir.log"
echo "mkroot: $suite/$arch at $dir in $(( $(date +%s) - start )) s" >&2
