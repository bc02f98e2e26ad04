#!/usr/bin/env bash
# Make a Docker engine and a base image available on a machine with no container registry:
# install Debian's docker.io, docker-compose and debootstrap when missing (as root), start
# dockerd when no engine answers, and build local/debian:bookworm when no base image is
# present. Prints the base image to use on its last line (NETKV_BASE_IMAGE).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${LOG_DIR:-results/compose}
mkdir -p "$LOG_DIR"

missing=()
command -v docker >/dev/null || missing+=(docker.io)
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "the compose testbed needs: ${missing[*]} (sudo apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${missing[@]}" | sort -u) >&2
fi

if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log: $LOG_DIR/dockerd.log)" >&2
  nohup dockerd >"$LOG_DIR/dockerd.log" 2>&1 &
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $LOG_DIR/dockerd.log" >&2; exit 1; }
fi

if [ -n "${NETKV_BASE_IMAGE:-}" ]; then
  base=$NETKV_BASE_IMAGE
elif docker image inspect python:3.11-slim >/dev/null 2>&1; then
  base=python:3.11-slim
else
  compose/build-base-image.sh >&2
  base=local/debian:bookworm
fi
echo "$base"
