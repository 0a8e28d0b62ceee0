#!/bin/sh
# After install or upgrade. deb: postinst configure [OLD_VERSION]; rpm: %post 1|2.
# Install enables and starts the service, upgrade restarts it. Without a running
# systemd (a chroot, an image build) the unit is only enabled, so it starts at boot.
set -eu
unit=elkeid-agent.service
case "${1:-}" in
    configure) [ -n "${2:-}" ] && mode=upgrade || mode=install ;;
    1) mode=install ;;
    2) mode=upgrade ;;
    *) exit 0 ;;
esac

mkdir -p -m 0700 /etc/elkeid/tmp
# The Go agent's elkeidctl put its unit (no Type=notify; a copy or a link, maybe
# dangling) in /etc/systemd/system, where it would shadow the packaged one. An admin's
# copy of this package's unit and a mask (a link to /dev/null) stay.
legacy=/etc/systemd/system/$unit
if { [ -e "$legacy" ] || [ -L "$legacy" ]; } && [ "$(readlink "$legacy")" != /dev/null ] &&
    ! grep -q '^Type=notify' "$legacy" 2>/dev/null; then
    rm -f "$legacy" "/etc/systemd/system/multi-user.target.wants/$unit"
    echo "elkeid-agent: removed the Go agent's $legacy" >&2
fi
# Like the Go package: an installer may pass the IDC, region and agent id.
for pair in "idc:${SPECIFIED_IDC:-}" "region:${SPECIFIED_REGION:-}" "id:${SPECIFIED_AGENT_ID:-}"; do
    value=${pair#*:}
    if [ -n "$value" ]; then
        TMPDIR=/etc/elkeid/tmp /etc/elkeid/elkeid-agent ctl set "--${pair%%:*}=$value" >/dev/null ||
            echo "elkeid-agent: could not set ${pair%%:*}" >&2
    fi
done

# The unit's MemoryMax= arrived in systemd 231: older ones (CentOS 7's 219) ignore it as
# an unknown key and would run the agent without a memory limit. MemoryLimit=, the old name,
# goes in a drop-in there only: in the unit itself newer systemds warn about it
# (docs/packaging.md). Written again at each upgrade, so a host whose systemd was upgraded
# loses it.
dropin=/etc/systemd/system/$unit.d/elkeid-memory-limit.conf
systemd_version=$(systemctl --version 2>/dev/null | sed -n '1s/^systemd \([0-9][0-9]*\).*/\1/p')
if [ -n "$systemd_version" ] && [ "$systemd_version" -lt 231 ]; then
    # The same figure as the unit's MemoryMax= (merged /usr: one file under two names).
    limit=$(sed -n 's/^MemoryMax=//p' /lib/systemd/system/$unit /usr/lib/systemd/system/$unit \
        2>/dev/null | head -n 1)
    mkdir -p "${dropin%/*}"
    printf '# Written by the elkeid-agent package: systemd %s has no MemoryMax=.\n[Service]\nMemoryLimit=%s\n' \
        "$systemd_version" "${limit:-250M}" >"$dropin"
else
    rm -f "$dropin"
    rmdir "${dropin%/*}" 2>/dev/null || true
fi
if command -v systemctl >/dev/null 2>&1; then
    # Works offline too: enabling only writes symlinks.
    systemctl enable "$unit" >/dev/null 2>&1 || echo "elkeid-agent: could not enable $unit" >&2
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    # --no-block: the package manager need not wait for READY=1 (seconds under the
    # 10 % CPU quota); `elkeid-agent ctl status` shows the outcome.
    if [ "$mode" = install ]; then
        systemctl start --no-block "$unit" || echo "elkeid-agent: could not start $unit" >&2
    else
        systemctl restart --no-block "$unit" || echo "elkeid-agent: could not restart $unit" >&2
    fi
else
    echo "elkeid-agent: systemd is not running here; $unit starts at the next boot" >&2
fi
exit 0
