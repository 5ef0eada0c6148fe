#!/bin/sh
# Build an image of docker/Dockerfile with whatever this machine has: a Docker engine, else podman,
# else buildah (chroot isolation, vfs storage: no daemon, no fuse, no user namespaces needed).
#   make image [TARGET=cpu|cpu-serve|gpu] [IMAGE=dpr-service:$TARGET] [ENGINE=docker|podman|buildah]
#              [PYTHON_IMAGE=base] [TORCH_INDEX_URL=url | TORCH_WHEELS=dir] [PIP_INDEX_URL=url]
#              [EXTRA_CA_CERTS="file.crt ..."] [LAYERS=1 (buildah: keep the layer cache)]
# (docker/image.sh reads the same names from its environment; docs/deployment.md.)
#   TORCH_WHEELS    a directory holding torch-2.13.0+cpu's wheel: staged into docker/local/wheels/,
#                   it replaces PyTorch's index (TORCH_INDEX_URL: another plain index)
#   EXTRA_CA_CERTS  PEM certificates pip must trust while building (a proxy's, a private index's):
#                   staged into docker/local/ca/, not left in the image
# Prints the image's size when done.
set -eu
cd "$(dirname "$0")/.."
TARGET=${TARGET:-cpu}
IMAGE=${IMAGE:-dpr-service:$TARGET}
: "${STORAGE_DRIVER:=vfs}"  # buildah's storage driver (podman and docker keep their own configuration)

if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then ENGINE=podman
  elif command -v buildah >/dev/null 2>&1; then ENGINE=buildah
  else echo "image.sh: no docker engine, podman or buildah here (Debian: apt-get install buildah)" >&2; exit 2
  fi
fi

# stage the wheel directory and the certificates (docker/local/ is in the build context), and
# remove them however the build ends
rm -rf docker/local/wheels docker/local/ca
trap 'rm -rf docker/local/wheels docker/local/ca' EXIT
if [ -n "${TORCH_WHEELS:-}" ]; then
  set -- "$TORCH_WHEELS"/torch-2.13.0+cpu-*.whl
  [ -f "$1" ] || { echo "image.sh: TORCH_WHEELS=$TORCH_WHEELS has no torch-2.13.0+cpu-*.whl" >&2; exit 2; }
  mkdir -p docker/local/wheels
  for w in "$@"; do ln "$w" docker/local/wheels/ 2>/dev/null || cp "$w" docker/local/wheels/; done
fi
if [ -n "${EXTRA_CA_CERTS:-}" ]; then
  mkdir -p docker/local/ca
  i=0
  for c in $EXTRA_CA_CERTS; do
    [ -f "$c" ] || { echo "image.sh: EXTRA_CA_CERTS: $c is not a file" >&2; exit 2; }
    i=$((i + 1)); cp "$c" "docker/local/ca/extra-$i.crt"
  done
fi

set -- --target "$TARGET" -t "$IMAGE" -f docker/Dockerfile
for arg in PYTHON_IMAGE TORCH_INDEX_URL PIP_INDEX_URL; do
  eval "val=\${$arg:-}"
  # shellcheck disable=SC2154
  [ -z "$val" ] || set -- "$@" --build-arg "$arg=$val"
done

echo "== building $IMAGE (target $TARGET) with $ENGINE"
case $ENGINE in
  docker)  docker build "$@" . ;;
  # docker format: OCI image configs have no HEALTHCHECK
  podman)  podman build --format docker --layers "$@" . ;;
  # no --layers unless LAYERS=1: under vfs every cached layer is a full copy of the file system
  # (tens of GB for these images); without it each stage runs in one working container
  buildah) buildah --storage-driver "$STORAGE_DRIVER" bud --isolation chroot --format docker --layers="${LAYERS:-0}" "$@" . ;;
  *) echo "image.sh: ENGINE=$ENGINE: docker, podman or buildah" >&2; exit 2 ;;
esac
rm -rf docker/local/wheels docker/local/ca

case $ENGINE in
  docker) size=$(docker image inspect --format '{{.Size}}' "$IMAGE") ;;
  buildah) size=$(buildah --storage-driver "$STORAGE_DRIVER" images --format '{{.Size}}' --filter "reference=$IMAGE" | head -n 1) ;;
  *) size=$($ENGINE images --format '{{.Size}}' --filter "reference=$IMAGE" | head -n 1) ;;
esac
echo "== built $IMAGE: $size"
