#!/usr/bin/env bash
# Build the frozen agent inside a Debian 12 root (chroot, container or VM), any arch.
#
#   build-in-root.sh SRC_DIR OUT_DIR VERSION PRODUCT_CONFIG
#
# SRC_DIR is the project checkout (read only is fine), OUT_DIR receives
#   elkeid-agent          the shipped executable (staticx-wrapped unless STATICX=0)
#   elkeid-agent.onefile  PyInstaller's output before wrapping (for checks and bench)
# Environment: SOURCE_DATE_EPOCH (default: now), STATICX=0|1 (default 1),
# STATICX_COMPRESS=0|1 (default 0: see docs/packaging.md), BUILD_VENV
# (default /opt/elkeid-build/venv, reused while constraints.txt is unchanged),
# PIP_INDEX_URL/PIP_CERT/... as the root's pip needs them (the caller passes only
# what holds inside the root: no host paths such as PIP_FIND_LINKS).
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 SRC_DIR OUT_DIR VERSION PRODUCT_CONFIG" >&2; exit 2; }
src=$(cd "$1" && pwd) out=$2 version=$3 product=$4
venv=${BUILD_VENV:-/opt/elkeid-build/venv}
work=${BUILD_WORK:-/var/tmp/elkeid-build}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(date +%s)}
# PyInstaller's own advice for reproducible output: fixed hash seed for its build.
export PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1
# The PYZ of Python modules is compressed at level 6 by default (the rest at 9).
export PYINSTALLER_ZLIB_COMPRESSION_LEVEL=9
t0=$(date +%s)
step() { echo "build-in-root: [$(( $(date +%s) - t0 ))s] $*" >&2; }

case $version in
    *[!0-9A-Za-z.+~-]* | "") echo "bad VERSION: $version" >&2; exit 2 ;;
esac
[ -f "$product" ] || { echo "no PRODUCT_CONFIG file: $product" >&2; exit 2; }

# 1. Debian tools: PyInstaller needs libpython3.11 and binutils (strip, objcopy);
#    staticx needs patchelf and ldd; mypyc needs gcc and python3-dev.
need=()
for pair in python3:python3 patchelf:patchelf objcopy:binutils strip:binutils gcc:gcc; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
ls /usr/lib/*/libpython3*.so.1* >/dev/null 2>&1 || need+=(libpython3.11)
# mypyc's C needs Python.h (a root made before the hot loop was compiled lacks it).
ls /usr/include/python3*/Python.h >/dev/null 2>&1 || need+=(python3-dev)
if [ ${#need[@]} -gt 0 ]; then
    step "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" ca-certificates >/dev/null
fi

# 2. Build venv from the project's pins, rebuilt only when the pins change.
packages="uvloop grpcio protobuf psutil cryptography msgspec h11 pyinstaller staticx mypy"
stamp="$(echo "$packages" | cat - "$src/constraints.txt" | sha256sum | cut -c1-16)-$(python3 -V 2>&1 | tr -dc 0-9.)"
if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
    step "creating $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086 # one word per package
    "$venv/bin/pip" install -q -c "$src/constraints.txt" $packages
    echo "$stamp" >"$venv/.stamp"
fi

# 3. A private copy of the source: version.py and product.toml are the build's inputs
#    and the checkout's tracked files stay untouched.
rm -rf "$work"
mkdir -p "$work/src" "$out"
tar -C "$src" --exclude=__pycache__ --exclude='*.pyc' -cf - elkeid_agent | tar -C "$work/src" -xf -
sed -i "s/^VERSION = .*/VERSION = \"$version\"/" "$work/src/elkeid_agent/version.py"
grep -q "^VERSION = \"$version\"\$" "$work/src/elkeid_agent/version.py"
cp "$product" "$work/src/elkeid_agent/product.toml"

# 4. The hot loop compiled with mypyc (its generated C needs gcc and python3-dev), checked to
#    be the module the bundle will import.
step "mypyc"
"$venv/bin/python" "$src/tools/compile_hot.py" --required --root "$work/src" >&2
(cd "$work/src" && "$venv/bin/python" -c \
    'from elkeid_agent import framescan; assert framescan.compiled(), framescan.__file__')

# 5. PyInstaller onefile.
step "pyinstaller"
ELKEID_BUILD_SRC="$work/src" ELKEID_BUILD_WORK="$work" \
    "$venv/bin/pyinstaller" --noconfirm --clean --log-level WARN \
    --distpath "$work/dist" --workpath "$work/pyi" "$src/build/pyinstaller.spec" 2>&1 |
    grep -v '^$' >&2
cp "$work/dist/elkeid-agent" "$out/elkeid-agent.onefile"

# 6. staticx: the libc and loader go inside, so the host's glibc version stops mattering.
if [ "${STATICX:-1}" = 1 ]; then
    step "staticx"
    args=()
    [ "${STATICX_COMPRESS:-0}" = 1 ] || args+=(--no-compress)
    TMPDIR=$work "$venv/bin/python" "$src/build/staticx-sde.py" "${args[@]}" \
        "$work/dist/elkeid-agent" "$work/elkeid-agent"
    # The launcher's symbols and debug info (20 kB); its archive is a non-allocated
    # section that a plain strip would drop with them.
    strip --strip-all --keep-section=.staticx.archive "$work/elkeid-agent"
    install -m 0755 "$work/elkeid-agent" "$out/elkeid-agent"
else
    install -m 0755 "$work/dist/elkeid-agent" "$out/elkeid-agent"
fi
"$out/elkeid-agent" --version | grep -qx "$version" || {
    echo "built executable does not report $version" >&2
    exit 1
}
# Import smoke test: `run` imports the agent (grpc, protobuf, msgspec...) before it
# reads its config, so a module PyInstaller missed (C-level imports are invisible to it)
# fails here with a traceback instead of the config error (EX_CONFIG, 78) on a host.
rc=0
"$out/elkeid-agent" run --config /nonexistent/elkeid-agent.toml >/dev/null 2>"$work/smoke.err" || rc=$?
if [ "$rc" != 78 ]; then
    cat "$work/smoke.err" >&2
    echo "import smoke test: exit $rc, not 78 (configuration error)" >&2
    exit 1
fi
step "done"
(cd "$out" && sha256sum elkeid-agent elkeid-agent.onefile)
ls -l "$out/elkeid-agent" "$out/elkeid-agent.onefile" >&2
