#!/usr/bin/env bash
# Builds corelab's air-gapped base image: Debian bookworm (minbase) with python3 and venv,
# made by debootstrap from the Debian mirror this machine's apt already uses, then turned into
# an image by `podman build` (FROM scratch, ADD of the rootfs tarball). Nothing is fetched from a
# container registry, which is what a hospital network without registry access needs too.
#
#   containers/build_base.sh [IMAGE_NAME]      default: localhost/corelab-base:bookworm
#   containers/build_base.sh --tarball         only make (or reuse) the rootfs tarball
#
# Reproducible: the same mirror snapshot gives the same image ID on any machine with the same
# podman. The rootfs tarball (cached in containers/.cache/, git-ignored; CORELAB_BASE_CACHE
# moves it) is written with sorted names, numeric owners and mtimes clamped to EPOCH, after the
# per-run files (caches, logs, machine-id, shadow's install date) are removed; the image is
# committed with `podman build --timestamp EPOCH`, so its created time, history and every file's
# mtime in the layer are EPOCH. (`podman import` would stamp the import time into the config:
# a new image ID on every import of the same tarball.)
# The mirror is read from apt's configuration at run time; no host name lives in the repo.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME="${1:-localhost/corelab-base:bookworm}"
SUITE=bookworm
CACHE="${CORELAB_BASE_CACHE:-$HERE/.cache}"
TARBALL="$CACHE/base-$SUITE.tar"
# Files newer than this are clamped to it in the tarball; the image's timestamp (2025-01-01Z).
# pipelines/image_build.py SOURCE_DATE_EPOCH is the same number.
EPOCH=1735689600
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/podman/containers.conf}"

# The "deb" source of $SUITE main as apt itself resolves it (any sources format).
apt_mirror() {
  apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT) $(TARGET_OF)' \
    | awk -v suite="$SUITE" '$2 == suite && $3 == "main" && $4 == "deb" { print $1; exit }' \
    | grep .
}

if [ "$NAME" != "--tarball" ] && podman image exists "$NAME"; then
  echo "build_base: $NAME already present ($(podman image inspect --format '{{.Id}}' "$NAME"))"
  exit 0
fi
for tool in debootstrap podman tar; do
  command -v "$tool" >/dev/null || { echo "build_base: $tool missing; run containers/setup_podman.sh" >&2; exit 1; }
done

if [ ! -f "$TARBALL" ]; then
  MIRROR=$(apt_mirror) || { echo "build_base: no '$SUITE main' deb source in apt's sources (/etc/apt/sources.list(.d)); run apt-get update" >&2; exit 1; }
  mkdir -p "$CACHE"
  ROOTFS=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$ROOTFS" "$TARBALL.tmp"' EXIT
  echo "build_base: debootstrap $SUITE (minbase + python3, python3-venv) from apt's mirror"
  # SOURCE_DATE_EPOCH and a fixed hash seed: what the maintainer scripts generate (py3compile's
  # byte code among them) does not depend on the day or the process.
  SOURCE_DATE_EPOCH=$EPOCH PYTHONHASHSEED=0 \
  debootstrap --variant=minbase --include=python3,python3-venv --components=main \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { echo "build_base: debootstrap failed, see $CACHE/debootstrap.log" >&2; exit 1; }
  # Caches, logs and machine identity differ per run and are useless in an image.
  rm -rf "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/* \
         "$ROOTFS"/var/cache/ldconfig/aux-cache "$ROOTFS"/var/lib/dpkg/*-old "$ROOTFS"/debootstrap
  : >"$ROOTFS/etc/machine-id"
  # The days-since-epoch of the install date in /etc/shadow would change every build.
  sed -i -E 's/^([^:]*:[^:]*:)[0-9]+:/\1:/' "$ROOTFS/etc/shadow" "$ROOTFS/etc/shadow-" 2>/dev/null || true
  tar -C "$ROOTFS" --sort=name --numeric-owner --owner=0 --group=0 --mtime="@$EPOCH" --clamp-mtime \
      --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  rm -rf "$ROOTFS"
  trap - EXIT
fi
if [ "$NAME" = "--tarball" ]; then
  echo "build_base: $TARBALL sha256 $(sha256sum "$TARBALL" | cut -d' ' -f1)"
  exit 0
fi
echo "build_base: $(du -h "$TARBALL" | cut -f1) rootfs -> $NAME (podman build --timestamp $EPOCH)"
CONTEXT=$(mktemp -d "$CACHE/base-context.XXXXXX")
trap 'rm -rf "$CONTEXT"' EXIT
ln "$TARBALL" "$CONTEXT/rootfs.tar" 2>/dev/null || cp "$TARBALL" "$CONTEXT/rootfs.tar"
cat >"$CONTEXT/Containerfile" <<'CONTAINERFILE'
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8
CMD ["/usr/bin/python3"]
CONTAINERFILE
podman build --quiet --network none --pull=never --timestamp "$EPOCH" \
  -t "$NAME" "$CONTEXT" >/dev/null
echo "build_base: $NAME $(podman image inspect --format '{{.Id}}' "$NAME")"
