#!/usr/bin/env bash
# Host driver of the aarch64 build:
#
#   build/arm64.sh prepare
#   build/arm64.sh exe OUT_DIR VERSION PRODUCT_CONFIG    (build/docker/build-exe.sh)
#
#   prepare  installs what is missing (qemu-user-static, binfmt-support, debootstrap,
#            podman, runc), registers qemu-aarch64 with binfmt_misc (F flag), makes the
#            arm64 bookworm build root under build/cache/arm64/ and imports it as the
#            podman base image. Idempotent; says what it needs when it cannot.
#   exe      prepare, then build OUT_DIR/elkeid-agent (and elkeid-agent.onefile,
#            elfcheck.txt) by running build/docker/Dockerfile: Docker buildx, else
#            podman, else a chroot into the build root (the documented fallback). All
#            three run the shared build/build-in-root.sh through
#            build/docker/in-container.sh. `make dist ARCH=arm64` (build/dist.sh) calls
#            this and packages the result.
#
# Environment: ARM64_ENGINE=auto|buildx|podman|chroot, SOURCE_DATE_EPOCH, DEBIAN_MIRROR,
# pip settings valid anywhere (PIP_INDEX_URL...). Docs: docs/aarch64.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
cache=$top/build/cache/arm64
root=$cache/root
image=localhost/elkeid-build-base:bookworm-arm64
# Debian packages of the build root: what build-in-root.sh needs (python3 with venv and
# headers, libpython3.11 for PyInstaller, binutils, patchelf for staticx) plus gcc,
# musl-tools and scons because staticx must be built from source on aarch64.
root_packages=python3,python3-venv,python3-dev,libpython3.11,gcc,libc6-dev,binutils,patchelf,musl-tools,scons,ca-certificates,file
export CONTAINERS_CONF=$here/docker/containers.conf

say() { echo "arm64: $*" >&2; }
die() {
    say "$*"
    exit 1
}
# Runs a phase and logs its wall time, which docs/aarch64.md records (cold and warm).
timed() {
    local name=$1 start
    shift
    start=$(date +%s)
    "$@"
    say "$name took $(($(date +%s) - start)) s"
    echo "$(date -u +%FT%TZ) $name $(($(date +%s) - start))" >>"$cache/timings.log"
}

native_arm64() { [ "$(uname -m)" = aarch64 ]; }

# qemu-user-static, binfmt-support, debootstrap, file; podman and runc when they can be
# had (without them the chroot fallback still works).
ensure_host_packages() {
    "$top/tools/host-tools.sh" dist-arm64 || die "host tools missing (above)"
}

binfmt_ready() {
    local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
    [ -r "$entry" ] && grep -qx enabled "$entry" && grep -q '^flags:.*F' "$entry"
}

# The F flag makes the kernel open the interpreter at registration, so it works inside
# chroots and containers that do not contain qemu-aarch64-static themselves.
ensure_binfmt() {
    native_arm64 && return 0
    binfmt_ready && return 0
    if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
            die "cannot mount binfmt_misc: run as root with CAP_SYS_ADMIN, or run" \
                "'mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc' on the host"
    fi
    update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
    binfmt_ready || die "qemu-aarch64 is not registered with the F flag" \
        "(/proc/sys/fs/binfmt_misc/qemu-aarch64); qemu-user-static from Debian 12 does that"
}

ensure_root() {
    [ -e "$root/.ready" ] && return 0
    timed debootstrap-build-root "$here/mkroot.sh" bookworm "$root" arm64 "$root_packages"
}

engine_podman_ok() { command -v podman >/dev/null && podman info >/dev/null 2>&1; }

# The image is imported from the root; a stamp of the root's creation time re-imports it
# when the root was made again.
ensure_image() {
    local stamp
    stamp=$(stat -c %Y "$root/.ready")
    if podman image exists "$image" &&
        [ "$(podman image inspect -f '{{ index .Labels "root-stamp" }}' "$image")" = "$stamp" ]; then
        return 0
    fi
    timed podman-import sh -c "tar -C '$root' -c . | podman import -q --arch arm64 \
        --change 'LABEL root-stamp=$stamp' - '$image' >/dev/null"
}

pick_engine() {
    local want=${ARM64_ENGINE:-auto}
    if [ "$want" = auto ]; then
        if command -v docker >/dev/null && docker buildx version >/dev/null 2>&1 &&
            docker info >/dev/null 2>&1; then
            want=buildx
        elif engine_podman_ok; then
            want=podman
        else
            want=chroot
        fi
    fi
    case $want in
    buildx | podman | chroot) echo "$want" ;;
    *) die "ARM64_ENGINE=$want: want auto, buildx, podman or chroot" ;;
    esac
}

prepare() {
    mkdir -p "$cache"
    ensure_host_packages
    ensure_binfmt
    local engine
    engine=$(pick_engine)
    # buildx pulls debian:bookworm from a registry; podman and chroot use the local root.
    if [ "$engine" != buildx ]; then
        ensure_root
    fi
    if [ "$engine" = podman ]; then
        ensure_image
    fi
    echo "$engine"
}

# The build context: the working tree (tracked and untracked files, minus what git
# ignores: .venv, dist, build/cache), the extra CA certificates and the product config.
stage_context() {
    local ctx=$1 product=$2
    rm -rf "$ctx"
    mkdir -p "$ctx/src" "$ctx/ca"
    (cd "$top" && git ls-files -z --cached --others --exclude-standard |
        xargs -0 -I{} sh -c '[ -e "$1" ] && printf "%s\0" "$1"' _ {} |
        tar --null -T - -cf -) | tar -xf - -C "$ctx/src"
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/"
    fi
    cp "$product" "$ctx/product.conf"
}

# Only settings that make sense in another root: host-only ones (PIP_FIND_LINKS,
# PIP_CONFIG_FILE, PIP_CONSTRAINT pointing at host paths) are deliberately left out.
write_pipenv() {
    local file=$1 v
    : >"$file"
    chmod 600 "$file"
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT PIP_RETRIES; do
        if [ -n "${!v:-}" ]; then
            printf '%s=%q\n' "$v" "${!v}" >>"$file"
        fi
    done
}

# Docker's own networking reaches the index (podman here has none, hence --network host
# there); --network host under BuildKit would need the network.host entitlement.
run_buildx() {
    local ctx=$1 out=$2 ver=$3 epoch=$4
    docker buildx build --platform linux/arm64 \
        --build-arg BUILD_VERSION="$ver" --build-arg SOURCE_DATE_EPOCH="$epoch" \
        --secret id=pipenv,src="$ctx.pipenv" \
        -f "$here/docker/Dockerfile" --output type=local,dest="$out" "$ctx"
}

# --layers=false and removing the result image afterwards: every build would otherwise
# leave ~800 MB of intermediate images behind. What makes a warm build fast is the
# RUN cache mounts (venv, pip), not layers; the steps before that RUN take seconds.
run_podman() {
    local ctx=$1 out=$2 ver=$3 epoch=$4
    podman build --platform linux/arm64 --network host --layers=false --iidfile "$ctx.iid" \
        --build-arg BASE_IMAGE="$image" \
        --build-arg BUILD_VERSION="$ver" --build-arg SOURCE_DATE_EPOCH="$epoch" \
        --secret id=pipenv,src="$ctx.pipenv" \
        -f "$here/docker/Dockerfile" --output type=local,dest="$out" "$ctx"
    podman rmi "$(cat "$ctx.iid")" >/dev/null
    rm -f "$ctx.iid"
}

# Fallback without a container engine: the same entry point through the shared
# build/run-in-root.sh (private mount namespace, clean environment with only the pip
# settings valid in the root), in an overlay over the build root. The overlay's upper
# layer persists in build/cache/arm64/chroot, as the build venv does in a container's
# cache mount, while the cached root (and the podman image made from it) stays clean.
run_chroot() {
    local ctx=$1 out=$2 ver=$3 epoch=$4 work=$cache/chroot stamp
    stamp=$(stat -c %Y "$root/.ready")
    if [ "$(cat "$work/stamp" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$work"
    fi
    mkdir -p "$work/upper" "$work/work" "$work/merged" "$out"
    echo "$stamp" >"$work/stamp"
    mount -t overlay overlay \
        -o "lowerdir=$root,upperdir=$work/upper,workdir=$work/work" "$work/merged"
    trap 'umount "$work/merged"' EXIT
    # The secret file of the container route becomes plain environment here.
    set -a
    # shellcheck disable=SC1090
    . "$ctx.pipenv"
    set +a
    SOURCE_DATE_EPOCH=$epoch "$here/run-in-root.sh" "$work/merged" \
        --bind "$ctx:/ctx:ro" --bind "$out:/out" -- \
        /ctx/src/build/docker/in-container.sh /ctx/src /out "$ver" /ctx/product.conf
    umount "$work/merged"
    trap - EXIT
}

build_exe() {
    [ $# -eq 3 ] || die "usage: $0 exe OUT_DIR VERSION PRODUCT_CONFIG"
    local out=$1 ver=$2 product=$3 engine epoch ctx result
    [ -r "$product" ] || die "PRODUCT_CONFIG $product is not readable"
    engine=$(prepare)
    epoch=${SOURCE_DATE_EPOCH:-$(git -C "$top" log -1 --format=%ct)}
    ctx=$cache/context
    result=$cache/result
    stage_context "$ctx" "$product"
    write_pipenv "$ctx.pipenv"
    rm -rf "$result"
    say "building $ver with $engine"
    timed "build-$engine" "run_$engine" "$ctx" "$result" "$ver" "$epoch"
    rm -f "$ctx.pipenv"
    mkdir -p "$out"
    cp "$result"/elkeid-agent "$result"/elkeid-agent.onefile "$result"/elfcheck.txt "$out/"
    tail -n 1 "$out/elfcheck.txt" >&2
}

case "${1:-}" in
prepare) prepare >/dev/null ;;
exe)
    shift
    build_exe "$@"
    ;;
*) die "usage: $0 prepare | exe OUT_DIR VERSION PRODUCT_CONFIG" ;;
esac
