#!/usr/bin/env bash
# Installs everything the assistant needs into ./.venv: system packages (Debian/Ubuntu, when run as
# root or with sudo), PyTorch (CPU build 2.13.0 unless TORCH_SPEC says otherwise) and the project.
#   bash scripts/install.sh          # to run the assistant
#   bash scripts/install.sh --test   # also what the tests need
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
system_packages=()
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
echo "installed into .venv"
