#!/usr/bin/env bash
# The consumer-package test (CTest: package.find_package_consumer).
#
#   run.sh BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR CXX VERSION [CONFIG] [EXTRA_FLAGS]
#
# 1. `cmake --install BUILD_DIR --prefix WORK_DIR/prefix`
# 2. configure, build and run the consumer with find_package(multiproc) and CMAKE_PREFIX_PATH
# 3. compile and run the same main.cpp with `pkg-config --cflags --libs multiproc`
# Any failure fails the test.
set -euo pipefail

if [[ $# -lt 5 ]]; then
  echo "usage: $0 BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR CXX VERSION [CONFIG] [EXTRA_FLAGS]" >&2
  exit 2
fi
build_dir=$1
source_dir=$2
work_dir=$3
cxx=$4
version=$5
config=${6:-}
extra_flags=${7:-}
[[ -n $config ]] || config=Release

step() { printf '\n=== %s\n' "$*"; }

# The scratch tree lies under the build tree and is ours alone: start from nothing.
case $work_dir in
  "$build_dir"/?*) ;;
  *) echo "refusing to use WORK_DIR outside the build tree: $work_dir" >&2; exit 2 ;;
esac
rm -rf -- "$work_dir"
mkdir -p -- "$work_dir"
prefix=$work_dir/prefix

step "install into $prefix"
cmake --install "$build_dir" --prefix "$prefix" --config "$config"
test -f "$prefix/include/multiproc/multiproc.hpp"

step "find_package(multiproc) consumer"
# An empty environment search path and a prefix path of only the scratch tree: the consumer
# must find this installation (its CMakeLists checks that it did).
env -u CMAKE_PREFIX_PATH -u multiproc_DIR -u multiproc_ROOT \
  cmake -S "$source_dir" -B "$work_dir/cmake-consumer" \
    -DCMAKE_BUILD_TYPE="$config" \
    -DCMAKE_CXX_COMPILER="$cxx" \
    -DCMAKE_CXX_FLAGS="$extra_flags" \
    -DCMAKE_EXE_LINKER_FLAGS="$extra_flags" \
    -DCMAKE_PREFIX_PATH="$prefix" \
    -DMULTIPROC_EXPECTED_PREFIX="$prefix" \
    -DMULTIPROC_EXPECTED_VERSION="$version"
cmake --build "$work_dir/cmake-consumer" --config "$config"
consumer=$work_dir/cmake-consumer/consumer
[[ -x $consumer ]] || consumer=$work_dir/cmake-consumer/$config/consumer
"$consumer"

step "pkg-config consumer"
pc_file=$(find "$prefix" -name multiproc.pc -print -quit)
if [[ -z $pc_file ]]; then
  echo "multiproc.pc was not installed" >&2
  exit 1
fi
export PKG_CONFIG_PATH
PKG_CONFIG_PATH=$(dirname -- "$pc_file")
unset PKG_CONFIG_LIBDIR PKG_CONFIG_SYSROOT_DIR
pc_version=$(pkg-config --modversion multiproc)
if [[ $pc_version != "$version" ]]; then
  echo "pkg-config reports multiproc $pc_version, expected $version" >&2
  exit 1
fi
pc_flags=$(pkg-config --cflags --libs multiproc)
echo "pkg-config --cflags --libs multiproc: $pc_flags"
# shellcheck disable=SC2086  # the flags are words
"$cxx" -std=c++20 $extra_flags "$source_dir/main.cpp" -o "$work_dir/pc-consumer" $pc_flags
"$work_dir/pc-consumer"

step "package test passed"
