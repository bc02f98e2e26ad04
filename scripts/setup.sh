#!/usr/bin/env bash
# Install what NetKV's main job and its tests need on this machine (Debian 12 / Ubuntu).
#
#   scripts/setup.sh run    redis-server, mosquitto, python3-venv   (what `make run` needs)
#   scripts/setup.sh test   the above plus iperf3, iproute2 (ip, tc) and chromium with
#                           chromium-driver for the browser test    (what `make test` needs)
#
# As root with apt-get: installs the missing Debian packages. Otherwise: prints the exact
# command to run and fails. Nothing else is read or written outside the repository.
set -euo pipefail
what=${1:-test}
case "$what" in run|test) ;; *) echo "usage: $0 run|test" >&2; exit 2 ;; esac

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
missing=()
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
have redis-server || missing+=(redis-server)
have mosquitto || missing+=(mosquitto)
if [ "$what" = test ]; then
  have iperf3 || missing+=(iperf3)
  { have ip && have tc; } || missing+=(iproute2)
  have chromium || missing+=(chromium)
  have chromedriver || missing+=(chromium-driver)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing ${missing[*]} from Debian ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The server packages may start system-wide services; netkv runs its own on loopback.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "setup: installed ${missing[*]}"
  exit 0
fi
echo "setup: netkv needs the Debian packages: ${missing[*]}" >&2
echo "setup: install them with:  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
exit 1
