#!/usr/bin/env bash
# Set up napari-hrseg on a fresh Debian machine: system libraries for Qt/Xvfb, a virtual environment in
# .venv with the pinned CPU build of PyTorch, and the package (editable) with its test and DICOM extras.
# Idempotent: a second run only checks.  Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
APT_PACKAGES=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0
  libxkbcommon-x11-0 libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-cursor0 libxcb-xkb1 libgl1 libegl1
  libglib2.0-0 libfontconfig1 libdbus-1-3 libxrender1 libxi6)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
  echo "setup: installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# The pinned CPU build first: an unpinned torch would pull several GB of CUDA packages.
if ! $VPY -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU)"
  $VPY -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "setup: installing napari-hrseg[dicom,test]"
$VPY -m pip install -q -e ".[dicom,test]" 2>&1 | grep -v "^WARNING: Location" || true
$VPY -c "import napari_hrseg, torch, napari; print(f'setup: ok (napari {napari.__version__}, torch {torch.__version__})')"
