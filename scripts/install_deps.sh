#!/usr/bin/env bash
# install_deps.sh: installs every Debian package pdserve builds and tests with. Idempotent: skips
# apt-get when all packages are already present. Run as root (or with sudo available).
set -euo pipefail

PKGS=(build-essential cmake pkg-config python3 python3-venv unzip
      libzmq3-dev libprotobuf-c-dev protobuf-c-compiler libjansson-dev libopenblas-dev
      libmicrohttpd-dev libxxhash-dev clang libclang-rt-14-dev)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_deps: all ${#PKGS[@]} packages present"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
