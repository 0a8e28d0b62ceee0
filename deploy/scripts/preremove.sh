#!/bin/sh
# Before removal. deb: prerm remove|upgrade|deconfigure|failed-upgrade; rpm: %preun 0|1.
# Only a real removal (deb remove, rpm erase = 0) stops and disables the service; an
# upgrade keeps it running until the new package's postinstall restarts it.
set -eu
unit=elkeid-agent.service
case "${1:-}" in
    remove | 0) ;;
    *) exit 0 ;;
esac
if [ -d /run/systemd/system ]; then
    # KillMode=control-group: the plugins stop with the agent.
    systemctl stop "$unit" || echo "elkeid-agent: could not stop $unit" >&2
fi
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable "$unit" >/dev/null 2>&1 || true
fi
exit 0
