#!/usr/bin/env bash
# Builds the OpenVINO extension with the sparse kernels for one Python environment:
#   kernels/build.sh PYTHON [DEST]
# The library lands in DEST, by default PYTHON's environment (<sys.prefix>/lib/vitsparse/), where the
# openvino-sparse engine looks for it (VITSPARSE_KERNELS_DIR points it elsewhere). When it cannot be built (no compiler, no cmake, no OpenVINO), the reason is
# written beside it instead and the script still succeeds: the rest of vitsparse works without it.
set -uo pipefail

python=${1:?usage: kernels/build.sh PYTHON}
source_dir=$(cd "$(dirname "$0")" && pwd)
prefix=$("$python" -c 'import sys; print(sys.prefix)')
dest=${2:-$prefix/lib/vitsparse}
build="$dest/build"
mkdir -p "$dest"
rm -f "$dest/unavailable.txt"

give_up() {
    echo "$1" > "$dest/unavailable.txt"
    rm -f "$dest/libvitsparse_openvino.so"
    echo "kernels: not built: $1" >&2
    exit 0
}

command -v cmake > /dev/null || give_up "cmake was not found when vitsparse was installed"
command -v "${CXX:-c++}" > /dev/null || give_up "no C++ compiler (${CXX:-c++}) was found when vitsparse was installed"
openvino_cmake=$("$python" -c 'import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), "cmake"))' 2> /dev/null) \
    || give_up "OpenVINO could not be imported when vitsparse was installed"
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)

echo "kernels: building the OpenVINO extension (log: $build/build.log)" >&2
mkdir -p "$build"
{
    cmake -S "$source_dir" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DOpenVINO_DIR="$openvino_cmake" -DCMAKE_INSTALL_PREFIX="$build/out" &&
    cmake --build "$build" --parallel &&
    cmake --install "$build"
} > "$build/build.log" 2>&1 || give_up "the extension failed to build (see $build/build.log): $(grep -m1 -i 'error' "$build/build.log")"
tmp="$dest/.libvitsparse_openvino.so.tmp"
cp "$build/out/libvitsparse_openvino.so" "$tmp" && mv "$tmp" "$dest/libvitsparse_openvino.so"
echo "kernels: built $dest/libvitsparse_openvino.so" >&2
