#!/usr/bin/env bash
# Installs those of the given Debian packages that are missing (sudo when not root); the one
# place tools/setup.sh, tools/sanitize.sh and tools/fuzz.sh install from.
#   tools/install_packages.sh LABEL PACKAGE...
set -euo pipefail
label=$1
shift
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -gt 0 ] || exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "$label: installing ${missing[*]}"
# Another job may hold the apt lock (e.g. a parallel set-up): wait for it.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
  --no-install-recommends "${missing[@]}" > /dev/null
