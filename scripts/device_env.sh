#!/usr/bin/env bash
# device_env.sh: source it on a machine without our Debian packages (the lent GPU machine), after
# carrying .debs/ there (scripts/fetch_debs.sh). Unpacks every .deb into $PD_PREFIX (default /tmp/pdprefix)
# and exports the paths CMake, pkg-config, the compiler and the loader need.
PD_PREFIX="${PD_PREFIX:-/tmp/pdprefix}"
if [ ! -f "$PD_PREFIX/.unpacked" ] && ls "$(dirname "${BASH_SOURCE[0]}")"/../.debs/*.deb >/dev/null 2>&1; then
    mkdir -p "$PD_PREFIX"
    for f in "$(dirname "${BASH_SOURCE[0]}")"/../.debs/*.deb; do dpkg -x "$f" "$PD_PREFIX"; done
    # -dev packages symlink to absolute /usr/lib paths: repoint them inside the prefix
    find "$PD_PREFIX" -type l | while read -r l; do
        t=$(readlink "$l")
        case "$t" in /*) [ -e "$PD_PREFIX$t" ] && ln -sf "$PD_PREFIX$t" "$l" ;; esac
    done
    # pkg-config files name prefix=/usr: point them at the unpacked tree
    # pkg-config files name prefix=/usr: point them at the unpacked tree. Drop Requires.private: it names
    # -dev packages of static-only dependencies we do not carry (we link shared libraries).
    find "$PD_PREFIX" -name '*.pc' -exec sed -i -e "s|^prefix=/usr|prefix=$PD_PREFIX/usr|" -e '/^Requires.private:/d' {} +
    touch "$PD_PREFIX/.unpacked"
fi
ML=x86_64-linux-gnu
export PATH="$PD_PREFIX/usr/bin:$PATH"
export PKG_CONFIG_PATH="$PD_PREFIX/usr/lib/$ML/pkgconfig:$PD_PREFIX/usr/lib/$ML/openblas-pthread/pkgconfig:$PD_PREFIX/usr/share/pkgconfig:${PKG_CONFIG_PATH:-}"
export LD_LIBRARY_PATH="$PD_PREFIX/usr/lib/$ML:$PD_PREFIX/usr/lib/$ML/openblas-pthread:${LD_LIBRARY_PATH:-}"
export LIBRARY_PATH="$PD_PREFIX/usr/lib/$ML:$PD_PREFIX/usr/lib/$ML/openblas-pthread:${LIBRARY_PATH:-}"
export CPATH="$PD_PREFIX/usr/include:$PD_PREFIX/usr/include/$ML:${CPATH:-}"
export CMAKE_PREFIX_PATH="$PD_PREFIX/usr:${CMAKE_PREFIX_PATH:-}"
