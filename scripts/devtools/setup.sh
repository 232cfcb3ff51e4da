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
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# compat: the checkout goes on sys.path by a plain .pth line; the default editable
# finder costs every `ferry` command 4-13 ms of start-up (a wheel install has none).
"$venv/bin/pip" install -q -e '.[test]' --config-settings editable_mode=compat
