#!/usr/bin/env bash
# Install what ferry needs on a Debian machine (as root) and make the venv.
# usage: setup.sh PYTHON VENV DEBIAN-PACKAGE...
set -euo pipefail
py=$1; venv=$2; shift 2
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
# The unprivileged user confined QEMUs run as (FERRY_QEMU_USER), in the group of /dev/kvm.
qemu_user=ferry-qemu
if ! getent passwd "$qemu_user" >/dev/null; then
    echo "creating system user $qemu_user"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$qemu_user"
fi
if getent group kvm >/dev/null && ! id -nG "$qemu_user" | grep -qw kvm; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO usermod -a -G kvm "$qemu_user"
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# compat: the checkout goes on sys.path by a plain .pth line; the default editable
# finder costs every `ferry` command 4-13 ms of start-up (a wheel install has none).
"$venv/bin/pip" install -q -e '.[test]' --config-settings editable_mode=compat
