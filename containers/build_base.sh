#!/usr/bin/env bash
# Builds corelab's air-gapped base image: Debian bookworm (minbase) with python3 and venv,
# made by debootstrap from the Debian mirror this machine's apt already uses, then imported
# into podman. Nothing is fetched from a container registry, which is what a hospital
# network without registry access needs too.
#
#   containers/build_base.sh [IMAGE_NAME]      default: localhost/corelab-base:bookworm
#
# The rootfs tarball is cached in containers/.cache/ (git-ignored), so a second build only
# re-imports it (seconds). The tarball is written reproducibly (sorted names, numeric
# owners, mtimes clamped), so the same mirror snapshot gives the same base layer.
# The mirror is read from apt's configuration at run time; no host name lives in the repo.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME="${1:-localhost/corelab-base:bookworm}"
SUITE=bookworm
CACHE="$HERE/.cache"
TARBALL="$CACHE/base-$SUITE.tar"
# Files newer than this are clamped to it in the tarball (2025-01-01T00:00:00Z).
EPOCH=1735689600
export CONTAINERS_CONF="$HERE/podman/containers.conf"

# The "deb" source of $SUITE main as apt itself resolves it (any sources format).
apt_mirror() {
  apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT) $(TARGET_OF)' \
    | awk -v suite="$SUITE" '$2 == suite && $3 == "main" && $4 == "deb" { print $1; exit }' \
    | grep .
}

if podman image exists "$NAME"; then
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
fi
echo "build_base: importing $(du -h "$TARBALL" | cut -f1) rootfs as $NAME"
podman import --change 'CMD ["/usr/bin/python3"]' --change 'ENV LANG=C.UTF-8' \
  "$TARBALL" "$NAME" >/dev/null
echo "build_base: $NAME $(podman image inspect --format '{{.Id}}' "$NAME")"
