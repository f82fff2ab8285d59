#!/usr/bin/env bash
# Installs dicomnode and what it needs on a Debian 12 / Python 3.11 machine (or image).
#   bash docker/install.sh          the node and its demo (no Debian packages needed)
#   bash docker/install.sh --test   also Orthanc + DICOMweb plugin, dcmtk, dicom3tools, openssl and redis-server for the tests,
#                                   systemd's tools and curl for the deployment guide's checks (docs/deploy.md),
#                                   and the real viewer: Chromium (+ nodejs/npm when node is missing),
#                                   playwright-core and OHIF in tests/viewer (tests/viewer/install.sh)
# Idempotent: what is already installed is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

with_test=0
[ "${1:-}" = "--test" ] && with_test=1
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
PY=${PYTHON:-python3}

if [ "$with_test" = 1 ]; then
  need=""
  for b in /usr/sbin/Orthanc /usr/bin/storescu /usr/bin/dsrdump /usr/bin/dciodvfy /usr/bin/openssl; do [ -x "$b" ] || need=1; done
  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need=1
  debs=()
  if [ -n "$need" ]; then debs+=(orthanc orthanc-dicomweb dcmtk dicom3tools openssl); fi
  # docs/deploy.md's checks (tests/integration/test_deploy.py): systemd-analyze, systemd-sysusers
  # and journald's settings (nothing is started), and curl for the health check.
  [ -x /usr/bin/systemd-analyze ] || debs+=(systemd)
  [ -x /usr/bin/curl ] || debs+=(curl)
  # The real viewer (tests/integration/test_viewer.py): Debian's Chromium, driven from node.
  [ -x /usr/bin/chromium ] || debs+=(chromium)
  command -v node >/dev/null 2>&1 || debs+=(nodejs npm)
  # The Celery runner's tests (tests/integration/test_celery.py): a real Redis broker.
  [ -x /usr/bin/redis-server ] || debs+=(redis-server)
  if [ "${#debs[@]}" -gt 0 ]; then
    echo "== Debian packages: ${debs[*]}"
    $SUDO apt-get update -qq
    # The orthanc package tries to start its system service; a container refuses that harmlessly.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${debs[@]}" >/dev/null
  fi
  bash tests/viewer/install.sh
fi

echo "== PyTorch (CPU wheel here; a GPU server keeps its CUDA build: any 2.2-2.14 satisfies dicomnode)"
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0

# pyradiomics 3.0.1 must be built against the installed numpy without build isolation
# (its sdist's isolated build is broken on Python 3.11).
if ! $PY -c "import radiomics" 2>/dev/null; then
  echo "== pyradiomics 3.0.1"
  $PY -m pip install -q numpy setuptools wheel versioneer
  $PY -m pip install -q --no-build-isolation pyradiomics==3.0.1
fi

echo "== dicomnode"
extra="cpu"; [ "$with_test" = 1 ] && extra="test"
$PY -m pip install -q -e ".[$extra]"
# pyenv puts new console scripts on PATH only after a rehash.
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
echo "== installed: $(command -v dicomnode || echo "$PY -m dicomnode")"
