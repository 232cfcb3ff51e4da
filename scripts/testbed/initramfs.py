"""The Linux test guest's userland: busybox-static, the /init script and the initramfs tree.

Split from scripts/testbed/linuxguest.py, which re-exports these names.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

from scripts.testbed.cpio import CpioEntry
from scripts.testbed.kernel import PT_INTERP, LinuxGuestError, elf_segments

BUSYBOX_PATHS = (Path("/usr/bin/busybox"), Path("/bin/busybox"))
ECHO_PORT = 7
HTTP_PORT = 80
TICK_INTERVAL_MS = 100

_BUSYBOX_VERSION_RE = re.compile(r"BusyBox v(\S+)(?: \(([^)]*)\))?")


# -- busybox ------------------------------------------------------------------------------


def find_busybox() -> Path:
    """The busybox-static binary (a dynamic busybox cannot run alone in an initramfs)."""
    for path in BUSYBOX_PATHS:
        if path.is_file() and os.access(path, os.X_OK):
            if any(p_type == PT_INTERP for p_type, _, _ in elf_segments(path.read_bytes())):
                raise LinuxGuestError(
                    f"{path} is dynamically linked: install the Debian package busybox-static"
                )
            return path
    raise LinuxGuestError("no busybox: install the Debian package busybox-static")


def _busybox_output(busybox: Path, *args: str) -> str:
    res = subprocess.run([str(busybox), *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise LinuxGuestError(f"{busybox} {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def busybox_version(busybox: Path) -> str:
    """E.g. "1.35.0 (Debian 1:1.35.0-4+deb12u1+b1)"."""
    m = _BUSYBOX_VERSION_RE.search(_busybox_output(busybox))
    if m is None:
        raise LinuxGuestError(f"{busybox} does not say its version")
    return m.group(1) + (f" ({m.group(2)})" if m.group(2) else "")


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of busybox's applets ("bin/sh", "usr/bin/nc", ...)."""
    return [line.strip() for line in _busybox_output(busybox, "--list-full").splitlines()
            if line.strip()]


# -- the initramfs ------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of ferry's Linux test guest (written by scripts/testbed/linuxguest.py).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Kernel messages stay off the console from here: they would split tick lines.
dmesg -n 1
exec 3>/dev/ttyS0
say() { echo "ferry-guest $*" >&3; }

while read -r m; do
    insmod "/lib/modules/$m" || say "error insmod $m failed"
done < /etc/ferry/modules

ip=dhcp
gw=
dirty=
for w in $(cat /proc/cmdline); do
    case "$w" in
        ferry.ip=*) ip="${w#ferry.ip=}" ;;
        ferry.gw=*) gw="${w#ferry.gw=}" ;;
        ferry.dirty=*) dirty="${w#ferry.dirty=}" ;;
    esac
done

ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 100 ]; do
    usleep 50000
    n=$((n + 1))
done
[ -e /sys/class/net/eth0 ] || say "error no eth0"
ip link set eth0 up
if [ "$ip" = dhcp ]; then
    udhcpc -i eth0 -s /etc/ferry/udhcpc.script -t 10 -T 1 -b -q >/dev/null 2>&1
else
    ip addr add "$ip" dev eth0 || say "error bad ferry.ip=$ip"
    [ -z "$gw" ] || ip route add default via "$gw" || say "error bad ferry.gw=$gw"
fi

read -r boot < /proc/sys/kernel/random/boot_id
mkdir -p /www
echo "ferry-guest $boot" > /www/index.html
# -ll: keep listening, one cat per connection, so connections are independent.
nc -ll -p @ECHO_PORT@ -e cat </dev/null >/dev/null 2>&1 &
httpd -p @HTTP_PORT@ -h /www

say "ready $boot ip=$ip"
if [ -n "$dirty" ]; then
    # A writer rewriting $dirty MiB of random data in RAM (tmpfs) as fast as it can.
    dd if=/dev/urandom of=/tmp/dirty-src bs=1M count="$dirty" 2>/dev/null
    cp /tmp/dirty-src /tmp/dirty
    say "dirtying $dirty MiB"
    ( while :; do dd if=/tmp/dirty-src of=/tmp/dirty bs=1M conv=notrunc 2>/dev/null; done ) &
fi
n=0
while :; do
    n=$((n + 1))
    read -r up _ < /proc/uptime
    echo "ferry-tick $boot $n $up" >&3
    usleep @TICK_US@
done
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event hook: apply the lease to $interface.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        for r in $router; do
            ip route replace default via "$r" dev "$interface"
            break
        done
        ;;
esac
exit 0
"""


def render_init() -> str:
    return (
        INIT_SCRIPT.replace("@ECHO_PORT@", str(ECHO_PORT))
        .replace("@HTTP_PORT@", str(HTTP_PORT))
        .replace("@TICK_US@", str(TICK_INTERVAL_MS * 1000))
    )


def initramfs_entries(busybox: bytes, applets: Sequence[str],
                      modules: Sequence[tuple[str, bytes]]) -> list[CpioEntry]:
    """Everything the guest's root holds; `modules` are (file name, ELF bytes) in load order."""
    files: list[CpioEntry] = [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("init", stat.S_IFREG | 0o755, render_init().encode()),
        CpioEntry("etc/ferry/udhcpc.script", stat.S_IFREG | 0o755, UDHCPC_SCRIPT.encode()),
        CpioEntry("etc/ferry/modules", stat.S_IFREG | 0o644,
                  "".join(f"{name}\n" for name, _ in modules).encode()),
    ]
    files += [CpioEntry(f"lib/modules/{name}", stat.S_IFREG | 0o644, elf) for name, elf in modules]
    taken = {f.name for f in files}
    files += [
        CpioEntry(applet, stat.S_IFLNK | 0o777, b"/bin/busybox")
        for applet in sorted(set(applets))
        if applet not in taken
    ]
    dirs = {"proc", "sys", "tmp", "run", "root"}
    for f in files:
        parts = f.name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    tree = [CpioEntry(d, stat.S_IFDIR | (0o1777 if d == "tmp" else 0o755))
            for d in sorted(dirs, key=lambda d: (d.count("/"), d))]
    return tree + files
