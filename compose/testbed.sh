#!/usr/bin/env bash
# Run the compose testbed on a machine with Debian's docker.io and docker-compose and no
# container registry: start dockerd if needed, build the local base image, build and start
# the stack, run the one-shot workload (prints the policy table), then bring it all down.
#   compose/testbed.sh            # full run
#   KEEP=1 compose/testbed.sh     # leave the stack up afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${LOG_DIR:-results/compose}
mkdir -p "$LOG_DIR"

if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log: $LOG_DIR/dockerd.log)"
  dockerd >"$LOG_DIR/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $LOG_DIR/dockerd.log" >&2; exit 1; }
fi

if [ -z "${NETKV_BASE_IMAGE:-}" ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1; then
    export NETKV_BASE_IMAGE=python:3.11-slim
  else
    compose/build-base-image.sh
    export NETKV_BASE_IMAGE=local/debian:bookworm
  fi
fi
echo "base image: $NETKV_BASE_IMAGE"

cleanup() { [ "${KEEP:-0}" = 1 ] || docker-compose down -v --remove-orphans -t 5; }
trap cleanup EXIT
start=$(date +%s)
docker-compose build
built=$(date +%s)
docker-compose up --exit-code-from workload workload 2>&1 | tee "$LOG_DIR/compose-up.log"
echo "build $((built - start))s, up + workload $(( $(date +%s) - built ))s"
