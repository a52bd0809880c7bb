#!/usr/bin/env bash
# Installs podman (+ runc, debootstrap) from Debian's packages when missing, then checks that
# podman answers with corelab's containers.conf. Used by `make test-containers` and .ci/run.
# Exit status 0: podman is usable; 1: it could not be installed or does not work here.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="$HERE/podman/containers.conf"

missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_podman: ${missing[*]} missing and apt-get is not available" >&2
    exit 1
  fi
  echo "setup_podman: installing podman runc debootstrap (apt-get)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq podman runc debootstrap >/dev/null
fi
if ! podman --runtime runc info --format '{{.Host.OCIRuntime.Name}}' >/dev/null; then
  echo "setup_podman: podman is installed but 'podman info' fails with $CONTAINERS_CONF" >&2
  exit 1
fi
echo "setup_podman: $(podman --version), runtime $(runc --version | head -n1)"
