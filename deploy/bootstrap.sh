#!/usr/bin/env bash
# Set up everything ddn-node needs on a fresh Debian 12 machine, idempotently:
#   - the Debian tools the tests and the demo use (Orthanc with its DICOMweb plugin, DCMTK,
#     dicom3tools, PixelMed, CTN, OpenJPH, Chromium, Node.js, nginx for the reverse-proxy
#     recipe);
#   - a virtual environment at .venv with the package and its pinned dependencies;
#   - the npm packages, pinned by their lock files: the OHIF viewer (deploy/ohif) and the
#     dcmjs-dimse test peer (tests/support/peers/dcmjs).
# Quick when everything is already there: apt runs only for missing tools, pip only when
# pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.ddn-installed

need_apt=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need_apt+=(orthanc)
command -v storescu >/dev/null 2>&1 || need_apt+=(dcmtk)
# OpenJPH's encoder makes the HTJ2K samples the decode census checks (no real file has one).
command -v ojph_compress >/dev/null 2>&1 || need_apt+=(openjph-tools)
command -v dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
ls /usr/lib/orthanc/libOrthancDicomWeb.so* >/dev/null 2>&1 || need_apt+=(orthanc-dicomweb)
command -v DicomSRValidator >/dev/null 2>&1 || need_apt+=(pixelmed-apps)
command -v simple_storage >/dev/null 2>&1 || need_apt+=(ctn)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# The documented HTTPS reverse-proxy recipe (docs/integration.md) is tested with nginx.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null; }
  # The orthanc package starts a system service where systemd runs; the demo and the
  # tests start their own Orthanc with their own configuration instead.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
    $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true
  fi
  # The same for nginx: the recipe's test runs its own, on ports of its own.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
    $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
fi

want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x $VENV/bin/python ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv $VENV
fi
if [ ! -f $STAMP ] || [ "$(cat $STAMP)" != "$want" ]; then
  echo "bootstrap: installing ddn-node and its pinned dependencies into $VENV (torch from the local wheel cache)"
  $VENV/bin/pip install -q --disable-pip-version-check -e '.[test,bench,lint]' 2>&1 | grep -v "^WARNING: Location" || true
  $VENV/bin/python -c "import ddn_node, torch, pynetdicom, highdicom" \
    || { echo "bootstrap: the install did not complete" >&2; exit 1; }
  echo "$want" > $STAMP
fi
deploy/fetch-ohif.sh
tests/support/peers/fetch-dcmjs.sh
echo "bootstrap: ready ($($VENV/bin/python -c 'import ddn_node; print("ddn-node", ddn_node.__version__)'))"
