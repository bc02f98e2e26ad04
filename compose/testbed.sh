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

NETKV_BASE_IMAGE=$(compose/ensure-engine.sh | tail -n 1)
export NETKV_BASE_IMAGE
echo "base image: $NETKV_BASE_IMAGE"

cleanup() { [ "${KEEP:-0}" = 1 ] || docker-compose down -v --remove-orphans -t 5; }
trap cleanup EXIT
start=$(date +%s)
docker-compose build
built=$(date +%s)
docker-compose up --exit-code-from workload workload 2>&1 | tee "$LOG_DIR/compose-up.log"
echo "build $((built - start))s, up + workload $(( $(date +%s) - built ))s"
