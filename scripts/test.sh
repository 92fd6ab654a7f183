#!/usr/bin/env bash
# Builds multiproc and runs every test: scripts/test.sh [--sanitize] [--tsan]
#
# Installs the Debian packages it needs when they are missing, configures a developer build
# (RelWithDebInfo, warnings as errors) in build/, builds it and runs CTest.
#   --sanitize  also build build-asan/ with AddressSanitizer + UndefinedBehaviorSanitizer and test it
#   --tsan      also build build-tsan/ with ThreadSanitizer (clang) and test it
# The same through the environment: MULTIPROC_TEST_SANITIZE=1, MULTIPROC_TEST_TSAN=1.
# Exits with CTest's status (the first failing one), 0 when every test passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/deps.sh
source scripts/deps.sh

sanitize=${MULTIPROC_TEST_SANITIZE:-0}
tsan=${MULTIPROC_TEST_TSAN:-0}
for arg in "$@"; do
  case $arg in
    --sanitize | --asan) sanitize=1 ;;
    --tsan) tsan=1 ;;
    -h | --help)
      sed -n '2,9p' scripts/test.sh | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "scripts/test.sh: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

multiproc_install_deps

status=0
# run_suite BUILD_DIR [CMAKE_ARGS...]: configure, build, test; remembers the first failure.
run_suite() {
  local build_dir=$1
  shift
  echo "=== $build_dir" >&2
  multiproc_configure "$build_dir" "$@"
  cmake --build "$build_dir" -j"$(multiproc_jobs)"
  local rc=0
  ctest --test-dir "$build_dir" --output-on-failure -j2 || rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
  fi
}

run_suite build
if [[ $sanitize == 1 ]]; then
  run_suite build-asan -DMULTIPROC_SANITIZE=ON
fi
if [[ $tsan == 1 ]]; then
  CC=clang CXX=clang++ run_suite build-tsan -DMULTIPROC_TSAN=ON -DCMAKE_CXX_COMPILER=clang++
fi
exit "$status"
