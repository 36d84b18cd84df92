#!/usr/bin/env bash
# Sets up napari-mambahome on a fresh Debian/Ubuntu machine with Python 3.11: the system libraries Qt
# and napari need under Xvfb, a virtual environment in .venv, PyTorch (CPU build 2.13.0 here; on a GPU
# machine install the CUDA build of your choice first), and the package with its napari, server and test extras.
# Idempotent: running it again only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-randr0
 libxcb-render-util0 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 libdbus-1-3"
missing=$(dpkg-query -W -f='${Package} ${Status}\n' $APT_PACKAGES 2>/dev/null | grep -v "install ok installed" | cut -d' ' -f1 || true)
missing="$missing $(for p in $APT_PACKAGES; do dpkg-query -W "$p" >/dev/null 2>&1 || echo "$p"; done)"
if [ -n "$(echo $missing)" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "setup: installing system packages: $(echo $missing)"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "setup: WARNING: cannot install system packages (not root, no sudo): $(echo $missing)" >&2
  fi
fi

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # The CPU build of PyTorch 2.13.0 from PyTorch's own index: PyPI's Linux wheel of the same version bundles
  # the CUDA libraries (several GB). Where that index cannot be reached, pip still takes a CPU wheel it finds
  # locally (find-links) or, last, PyPI's. Short timeout: an unreachable index must not stall the set-up.
  .venv/bin/python -m pip install -q --timeout 10 --retries 0 --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[napari,server,test]"
echo "setup: done ($(.venv/bin/python -c 'import torch, monai, napari; print("torch", torch.__version__, "monai", monai.__version__, "napari", napari.__version__)'))"
