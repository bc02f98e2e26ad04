#!/usr/bin/env bash
# Make sure redis-server and mosquitto are installed (what `netkv up` starts on loopback).
# As root on Debian/Ubuntu: installs the missing packages with apt-get. Otherwise: says exactly
# what to install and fails.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} from Debian ..."
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # The packages start system-wide services; netkv up runs its own on free ports instead.
  exit 0
fi
echo "netkv needs: ${missing[*]}" >&2
echo "install them with:  sudo apt-get install -y ${missing[*]}" >&2
exit 1
