#!/usr/bin/env bash
# `make dist`: build the executable for ARCH and package it.
#
#   build/dist.sh [ARCH]        (amd64 by default)
#
# Inputs (environment), each with a test default:
#   BUILD_VERSION   default: VERSION in elkeid_agent/version.py with the test marker "~test"
#                   (1.9.0.0~test: visible, and below the release in dpkg's and rpm's order)
#   CERTS_DIR       ca.crt, client.crt, client.key; default: a test PKI made once in
#                   build/out/test-certs (elkeid_center.certs)
#   PRODUCT_CONFIG  TOML baked in as the agent's defaults; default build/product.default.toml
#   DIST_DIR        default dist/
#   PACKAGE_MAINTAINER  "Name <address>" of the packages (build/package.sh)
#   SIGNING_KEY     an Ed25519 private key file (tools/sign.py keygen): signed copies of the
#                   executable, the deb and the rpm (elkeid-agent VERSION, docs/signing.md)
#                   go to DIST_DIR/signed/, for the server's upload page; the files in
#                   DIST_DIR stay as built, to install by hand (rpm refuses a package with
#                   bytes after its payload). SIGNING_ALLOW_DOWNGRADE=1 lets hosts that run
#                   a higher version take this one. Unset: nothing is signed.
# Outputs: DIST_DIR/elkeid-agent-VERSION-linux-ARCH, the .deb and the .rpm, with sha256.
#
# amd64 builds in a Debian 12 root made by debootstrap and cached in build/cache/roots
# (about 1.5 min the first time), with build/build-in-root.sh, the script every
# architecture's build runs. arm64 runs build/docker/build-exe.sh (the aarch64 build),
# which must leave the executable at OUT_DIR/elkeid-agent.
set -euo pipefail
arch=${1:-amd64}
here=$(cd "$(dirname "$0")" && pwd)
project=$(dirname "$here")
cd "$project"
# The version, and the inputs left to their test defaults (build/inputs.sh).
. "$here/inputs.sh"
product=$(realpath "${PRODUCT_CONFIG:-build/product.default.toml}")
dist=${DIST_DIR:-dist}
out=build/out/$arch
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
t0=$(date +%s)
say() { echo "dist: [$(( $(date +%s) - t0 ))s] $*" >&2; }

# debootstrap, util-linux...: installed when missing, or named (tools/host-tools.sh).
case $arch in
    arm64) tools/host-tools.sh dist-arm64 ;;
    *) tools/host-tools.sh dist ;;
esac

if [ -z "${CERTS_DIR:-}" ]; then
    CERTS_DIR=build/out/test-certs
    .venv/bin/python build/gen-test-certs.py "$CERTS_DIR" >/dev/null
    say "test certificates from $CERTS_DIR (set CERTS_DIR for real ones)"
fi

mkdir -p "$out" "$dist"
# One build per ARCH at a time: builds share build/out/ARCH and the build root (venv,
# work dir). The lock goes with this process.
exec 9>"$out.lock"
flock 9
rm -f "$out/elkeid-agent" "$out/elkeid-agent.onefile"
case $arch in
    amd64)
        root=${BUILD_ROOT:-build/cache/roots/bookworm-build-amd64}
        say "build root $root"
        build/mkroot.sh bookworm "$root" amd64 \
            python3,python3-venv,libpython3.11,python3-dev,gcc,libc6-dev,patchelf,binutils,ca-certificates
        cp "$product" "$out/product.toml"
        say "building $version in the root"
        build/run-in-root.sh "$root" --bind "$project:/src:ro" --bind "$project/$out:/out" -- \
            /src/build/build-in-root.sh /src /out "$version" /out/product.toml
        say "checking every ELF in the executable"
        build/run-in-root.sh "$root" --bind "$project:/src:ro" -- \
            /opt/elkeid-build/venv/bin/python /src/build/elfcheck.py "/src/$out/elkeid-agent" \
            >"$out/elfcheck.txt" || { cat "$out/elfcheck.txt" >&2; exit 1; }
        tail -n 1 "$out/elfcheck.txt" >&2
        ;;
    arm64)
        [ -x build/docker/build-exe.sh ] || {
            echo "dist: no build/docker/build-exe.sh for arm64 yet" >&2
            exit 1
        }
        build/docker/build-exe.sh "$out" "$version" "$product"
        ;;
    *) echo "dist: unknown ARCH $arch" >&2; exit 2 ;;
esac

exe=$dist/elkeid-agent-$version-linux-$arch
install -m 0755 "$out/elkeid-agent" "$exe"
say "packaging"
build/package.sh "$arch" "$exe" "$version" "$CERTS_DIR" "$dist" >/dev/null
rpm_arch=$([ "$arch" = arm64 ] && echo aarch64 || echo x86_64)
artifacts=("elkeid-agent-$version-linux-$arch" "elkeid-agent_${version}_$arch.deb"
    "elkeid-agent-$version-1.$rpm_arch.rpm")
if [ -n "${SIGNING_KEY:-}" ]; then
    # After packaging: the packages hold the executable as built, each copy its own block.
    say "signing with $SIGNING_KEY into $dist/signed"
    mkdir -p "$dist/signed"
    for artifact in "${artifacts[@]}"; do
        cp "$dist/$artifact" "$dist/signed/$artifact"
    done
    .venv/bin/python tools/sign.py sign --key "$SIGNING_KEY" --name elkeid-agent \
        --version "$version" ${SIGNING_ALLOW_DOWNGRADE:+--allow-downgrade} \
        "${artifacts[@]/#/$dist/signed/}" >&2
fi
say "done: $(du -h "$exe" | cut -f1) executable"
(cd "$dist" && sha256sum "${artifacts[@]}" ${SIGNING_KEY:+"${artifacts[@]/#/signed/}"})
not_a_release >&2
