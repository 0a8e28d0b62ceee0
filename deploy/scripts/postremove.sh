#!/bin/sh
# After removal. deb: postrm remove|purge|upgrade|...; rpm: %postun 0|1.
# deb remove keeps the host's state (machine-id, specified_env, plugins, logs) for a
# later reinstall and drops only unpack leftovers; deb purge and rpm erase (rpm has no
# purge) remove all of /etc/elkeid, so nothing is left behind.
set -eu
case "${1:-}" in
    purge | 0) rm -rf /etc/elkeid ;;
    remove) rm -rf /etc/elkeid/tmp /etc/elkeid/status.json ;;
    *) exit 0 ;;
esac
# The drop-in postinstall wrote on systemd < 231 goes with the unit.
dropins=/etc/systemd/system/elkeid-agent.service.d
rm -f "$dropins/elkeid-memory-limit.conf"
rmdir "$dropins" 2>/dev/null || true
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
