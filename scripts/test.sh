#!/usr/bin/env bash
# Builds multiproc and runs every test: scripts/test.sh [--quick]
#
# Installs the Debian packages it needs when they are missing, then, each in its own build folder:
#   build/       the developer build (RelWithDebInfo, warnings as errors) and every CTest test
#   build-asan/  the same under AddressSanitizer + UndefinedBehaviorSanitizer
#   build-tsan/  the same under ThreadSanitizer (clang)
#   build-fuzz/  the libFuzzer targets, each run for MULTIPROC_FUZZ_SECONDS (60 by default), then
#                every saved regression input (scripts/fuzz.sh does this part alone)
#   --quick      only build/ (for a quick local check; CI runs everything)
# Every suite runs even when an earlier one failed. Exits with the first failing suite's status,
# 0 when every test passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/deps.sh
source scripts/deps.sh

quick=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    -h | --help)
      sed -n '2,12p' scripts/test.sh | sed 's/^# \{0,1\}//'
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
# record RC: remembers the first failure.
record() {
  if [[ $1 -ne 0 && $status -eq 0 ]]; then
    status=$1
  fi
}

# run_suite BUILD_DIR [CMAKE_ARGS...]: configure, build, test.
run_suite() {
  local build_dir=$1
  shift
  local start=$SECONDS rc=0
  echo "=== $build_dir" >&2
  { multiproc_configure "$build_dir" "$@" && cmake --build "$build_dir" -j"$(multiproc_jobs)"; } || rc=$?
  if [[ $rc -eq 0 ]]; then
    ctest --test-dir "$build_dir" --output-on-failure -j2 || rc=$?
  fi
  echo "=== $build_dir: $([[ $rc -eq 0 ]] && echo passed || echo "FAILED ($rc)") in $((SECONDS - start)) s" >&2
  record "$rc"
}

run_suite build
if [[ $quick == 0 ]]; then
  run_suite build-asan -DMULTIPROC_SANITIZE=ON
  CC=clang CXX=clang++ run_suite build-tsan -DMULTIPROC_TSAN=ON -DCMAKE_CXX_COMPILER=clang++
  start=$SECONDS
  echo "=== build-fuzz" >&2
  rc=0
  scripts/fuzz.sh || rc=$?
  echo "=== build-fuzz: $([[ $rc -eq 0 ]] && echo passed || echo "FAILED ($rc)") in $((SECONDS - start)) s" >&2
  record "$rc"
fi
exit "$status"
