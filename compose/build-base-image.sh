#!/usr/bin/env bash
# Build the local base image `local/debian:bookworm` without a container registry:
# debootstrap a minimal Debian bookworm, add the host's CA bundle (so pip can reach the
# package index over HTTPS from inside containers), and `docker import` it.
# python3, python3-venv and pip are installed in the image so that the Dockerfiles can
# `pip install` NetKV on top. Users with registry access skip this and use python:3.11-slim.
set -euo pipefail

IMAGE=${IMAGE:-local/debian:bookworm}
SUITE=${SUITE:-bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WORK=${WORK:-$(mktemp -d /tmp/netkv-rootfs.XXXXXX)}
ROOTFS="$WORK/rootfs"

if docker image inspect "$IMAGE" >/dev/null 2>&1 && [ "${REBUILD:-0}" != 1 ]; then
  echo "base image $IMAGE already present (REBUILD=1 to rebuild)"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
trap 'umount -l "$ROOTFS/proc" 2>/dev/null || true; rm -rf "$WORK"' EXIT

echo "debootstrap $SUITE into $ROOTFS"
debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv,python3-pip,iproute2 \
  "$SUITE" "$ROOTFS" >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }

# The host's CA bundle: inside containers HTTPS to the package index is verified against it.
install -D -m 0644 "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
install -D -m 0644 "$CA_BUNDLE" "$ROOTFS/usr/local/share/ca-certificates/host-bundle.crt"
# Debian marks the system Python as externally managed; the Dockerfiles use a venv anyway.
rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*

echo "docker import -> $IMAGE"
tar -C "$ROOTFS" -c . | docker import \
  -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  -c 'CMD ["/bin/bash"]' - "$IMAGE"
docker run --rm "$IMAGE" python3 --version
