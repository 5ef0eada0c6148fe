#!/bin/sh
# Make a Python 3.11 base image from Debian's own packages, for machines that cannot pull
# python:3.11-slim-bookworm from a registry (no Docker Hub, or no registry at all):
#   docker/base-image.sh [TAG]          (default TAG: localhost/dpr-base:bookworm)
# then:  make image PYTHON_IMAGE=localhost/dpr-base:bookworm
# Needs mmdebstrap and buildah (Debian: apt-get install mmdebstrap buildah) and a Debian mirror
# (mmdebstrap uses the host's apt sources). The image has python3.11, venv, ca-certificates and
# useradd, and `python` on PATH, which is all docker/Dockerfile asks of its base.
# The merged-usr hook makes /bin, /lib, ... links into /usr as Debian 12 does and installs
# usr-is-merged: without it apt picks usrmerge to satisfy init-system-helpers, which brings perl
# (about 47 MB: libperl5.36, perl-modules-5.36) into the image.
# BUILDAH_FLAGS: storage options for buildah, e.g. "--storage-driver vfs" (the default here: it
# works without fuse-overlayfs or an overlay-capable filesystem).
set -eu
TAG=${1:-localhost/dpr-base:bookworm}
SUITE=${SUITE:-bookworm}
BUILDAH_FLAGS=${BUILDAH_FLAGS:---storage-driver vfs}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mmdebstrap --variant=apt --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
  "$SUITE" "$tmp/rootfs.tar"
# shellcheck disable=SC2086
ctr=$(buildah $BUILDAH_FLAGS from scratch)
# shellcheck disable=SC2086
buildah $BUILDAH_FLAGS add "$ctr" "$tmp/rootfs.tar" /
# shellcheck disable=SC2086
buildah $BUILDAH_FLAGS config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd python3 "$ctr"
# shellcheck disable=SC2086
buildah $BUILDAH_FLAGS commit --rm "$ctr" "$TAG"
echo "base image: $TAG"
