#!/usr/bin/env bash
# fetch_debs.sh: downloads (apt-get download, no install) the Debian packages pdserve builds against into
# .debs/ (git-ignored), for a machine that reaches no package registry (the lent GPU machine). There,
# scripts/device_env.sh unpacks them with dpkg -x into a prefix that CMake and the loader are pointed at.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(libzmq5 libzmq3-dev libsodium23 libpgm-5.3-0 libnorm1 libbsd0 libmd0
      libprotobuf-c1 libprotobuf-c-dev protobuf-c-compiler libprotoc32 libprotobuf32
      libjansson4 libjansson-dev libxxhash0 libxxhash-dev
      libmicrohttpd12 libmicrohttpd-dev
      libopenblas0-pthread libopenblas-pthread-dev libopenblas-dev libgfortran5
      pkgconf pkgconf-bin libpkgconf3)
mkdir -p .debs
cd .debs
if ls ./*.deb >/dev/null 2>&1 && [ "$(ls ./*.deb | wc -l)" -ge "${#PKGS[@]}" ]; then
    echo "fetch_debs: .debs/ already holds $(ls ./*.deb | wc -l) packages"
    exit 0
fi
apt-get download "${PKGS[@]}" >/dev/null
echo "fetch_debs: $(ls ./*.deb | wc -l) packages, $(du -sh . | cut -f1) in .debs/"
