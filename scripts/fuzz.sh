#!/usr/bin/env bash
# Builds the libFuzzer targets and runs them: scripts/fuzz.sh [CTEST_ARGS...]
#
# Installs the Debian packages it needs when they are missing, configures build-fuzz/ with clang
# (-DMULTIPROC_FUZZ=ON: the library and the fuzz targets under ASan + UBSan with libFuzzer's
# coverage), builds it and runs the CTest tests labelled "fuzz": each fuzzer for
# MULTIPROC_FUZZ_SECONDS (60 by default) over a scratch copy of fuzz/corpus/, then every input in
# fuzz/regressions/ once, one test after another. Arguments go to ctest (e.g. -R codec, -V, -j2).
# A crash's input lands in build-fuzz/fuzz/scratch/artifacts/<target>/; keep it as a regression
# test by copying it into fuzz/regressions/<target>/.
# Exits with CTest's status: 0 when no fuzzer found anything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/deps.sh
source scripts/deps.sh

for arg in "$@"; do
  case $arg in
    -h | --help)
      sed -n '2,11p' scripts/fuzz.sh | sed 's/^# \{0,1\}//'
      exit 0
      ;;
  esac
done

multiproc_install_deps

seconds=${MULTIPROC_FUZZ_SECONDS:-60}
CC=clang CXX=clang++ multiproc_configure build-fuzz \
  -DCMAKE_CXX_COMPILER=clang++ \
  -DMULTIPROC_FUZZ=ON -DMULTIPROC_FUZZ_SECONDS="$seconds" \
  -DMULTIPROC_BUILD_TESTS=OFF -DMULTIPROC_BUILD_EXAMPLES=OFF -DMULTIPROC_BUILD_BENCH=OFF -DMULTIPROC_INSTALL=OFF
cmake --build build-fuzz -j"$(multiproc_jobs)"
exec ctest --test-dir build-fuzz -L fuzz --output-on-failure "$@"
