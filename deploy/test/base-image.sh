#!/usr/bin/env bash
# A Debian bookworm base image with python3 and python3-venv, made without any image registry:
# debootstrap from the Debian mirror apt uses, then `docker import`. Idempotent: an existing
# image is kept. Usage: deploy/test/base-image.sh [IMAGE]   (default local/debian-python:bookworm)
set -euo pipefail
image="${1:-local/debian-python:bookworm}"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image exists"
  exit 0
fi
mirror=$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
  /etc/apt/sources.list.d/*.list 2>/dev/null || true) | grep -E '^(URIs:|deb )' \
  | grep -oE 'https?://[^ ]+/debian/?( |$)' | tr -d ' ' | head -n1)
mirror="${mirror:-http://deb.debian.org/debian}"
root=$(mktemp -d /tmp/loom-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
  bookworm "$root" "$mirror" > "$root.log" 2>&1 || { tail -n 30 "$root.log"; exit 1; }
rm -f "$root.log"
# apt inside images built FROM this base uses the same mirror.
echo "deb $mirror bookworm main" > "$root/etc/apt/sources.list"
# The base trusts the certificate authorities this build host adds (a proxy in front of the
# package registries, say), so pip inside the builds reaches PyPI as pip here does.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# pip uses its own CA bundle unless told: point it (and requests) at the system's.
tar -C "$root" -c . | docker import \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
  - "$image" >/dev/null
echo "built base image $image"
