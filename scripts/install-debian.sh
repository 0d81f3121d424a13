#!/usr/bin/env bash
# Installs the Debian packages listed in scripts/debian-packages.txt: the real
# parts the tests start themselves on loopback with their own config files.
# Their system services are never started: a policy-rc.d that refuses every
# start is in place while apt runs, so nothing ends up listening on all
# interfaces. Does nothing when every package is there.
set -euo pipefail
cd "$(dirname "$0")"

mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' debian-packages.txt | grep -v '^$' || true)
missing=()
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    sudo=sudo
else
    sudo=
fi
echo "install-debian: installing ${missing[*]}" >&2
policy=/usr/sbin/policy-rc.d
restore=
if [ -e "$policy" ]; then
    restore=$(mktemp)
    $sudo cp -p "$policy" "$restore"
fi
cleanup() {
    if [ -n "$restore" ]; then $sudo mv "$restore" "$policy"; else $sudo rm -f "$policy"; fi
}
trap cleanup EXIT
printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
$sudo chmod 755 "$policy"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
