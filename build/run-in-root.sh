#!/usr/bin/env bash
# Run a command inside a root filesystem with /proc, /sys, /dev and the project mounted:
#
#   build/run-in-root.sh ROOT [--bind HOST_DIR:ROOT_DIR[:ro]]... [--tmpfs ROOT_DIR[:OPTS]]...
#                        -- CMD ARGS...
#
# The mounts live in a private mount namespace (unshare -m), so they vanish with the
# command even if it is killed. The environment is rebuilt from scratch: only the pip
# and proxy settings that also hold inside the root pass (PIP_FIND_LINKS, constraint
# files and PIP_CONFIG_FILE name host paths and stay out).
set -euo pipefail
root=$(cd "$1" && pwd)
shift
binds=()
tmpfses=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case $1 in
        --bind) binds+=("$2") ;;
        --tmpfs) tmpfses+=("$2") ;;
        *) echo "run-in-root: unknown option $1" >&2; exit 2 ;;
    esac
    shift 2
done
[ "${1:-}" = "--" ] && shift

envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT \
    PIP_DISABLE_PIP_VERSION_CHECK PIP_RETRIES http_proxy https_proxy no_proxy HTTP_PROXY \
    HTTPS_PROXY NO_PROXY SOURCE_DATE_EPOCH STATICX STATICX_COMPRESS BUILD_VENV ELKEID_BUILD_EXCLUDE; do
    if [ -n "${!var:-}" ]; then
        envs+=("$var=${!var}")
    fi
done
# The root's own CA bundle holds the host's extra CAs (mkroot.sh put them there).
envs+=(PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt)

mounts="mount -t proc proc '$root/proc' && mount -t sysfs sysfs '$root/sys' && mount --rbind /dev '$root/dev'"
for spec in "${binds[@]}"; do
    IFS=: read -r host_dir root_dir mode <<<"$spec"
    mkdir -p "$root$root_dir"
    mounts+=" && mount --bind '$host_dir' '$root$root_dir'"
    if [ "${mode:-}" = ro ]; then
        mounts+=" && mount -o remount,bind,ro '$root$root_dir'"
    fi
done
for spec in "${tmpfses[@]}"; do
    IFS=: read -r root_dir opts <<<"$spec"
    mkdir -p "$root$root_dir"
    mounts+=" && mount -t tmpfs -o '${opts:-mode=1777}' tmpfs '$root$root_dir'"
done
exec unshare -m --propagation private -- sh -c "$mounts && exec chroot '$root' env -i $(printf "'%s' " "${envs[@]}") \"\$@\"" run-in-root "$@"
