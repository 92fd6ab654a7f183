#!/usr/bin/env bash
# Builds multiproc and runs every test: scripts/test.sh [--quick] [--suite NAME]... [--busy]
#
# Installs the Debian packages it needs when they are missing, then, each in its own build folder:
#   build/       the developer build (Release, warnings as errors): every target, every CTest test
#   build-user/  a user's build: Release with default options (warnings are not errors): the
#                library, then the package tests: an installed find_package and pkg-config
#                consumer, and a consumer that takes multiproc in with add_subdirectory
#   build-asan/  the developer build (RelWithDebInfo) under AddressSanitizer + UBSan
#   build-tsan/  the developer build (RelWithDebInfo) under ThreadSanitizer (clang)
#   build-fuzz/  the libFuzzer targets, each run for MULTIPROC_FUZZ_SECONDS (60 by default), then
#                every saved regression input (scripts/fuzz.sh does this part alone)
#   --quick      only build/ (for a quick local check; CI runs everything)
#   --suite S    only suite S (build, user, asan, tsan or fuzz); may be given several times
#   --busy       keeps every core busy with a spinning process for the whole run, to check that the
#                tests hold on a loaded machine (they assert what happens, never how fast)
# Every suite runs even when an earlier one failed. Exits with the first failing suite's status,
# 0 when every test passed. Each suite's time is printed as it ends.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/deps.sh
source scripts/deps.sh

suites=()
busy=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) suites+=(build) ;;
    --busy) busy=1 ;;
    --suite)
      case ${2:-} in
        build | user | asan | tsan | fuzz) suites+=("$2") ;;
        *)
          echo "scripts/test.sh: --suite takes build, user, asan, tsan or fuzz" >&2
          exit 2
          ;;
      esac
      shift
      ;;
    -h | --help)
      sed -n '2,18p' scripts/test.sh | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "scripts/test.sh: unknown argument '$1' (try --help)" >&2
      exit 2
      ;;
  esac
  shift
done
[[ ${#suites[@]} -gt 0 ]] || suites=(build user asan tsan fuzz)
# wanted SUITE: whether SUITE is to run.
wanted() {
  local s
  for s in "${suites[@]}"; do [[ $s == "$1" ]] && return 0; done
  return 1
}

multiproc_install_deps

spinners=()
stop_spinners() {
  local pid
  for pid in "${spinners[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${spinners[@]}"; do wait "$pid" 2>/dev/null || true; done
  spinners=()
}
if [[ $busy == 1 ]]; then
  trap stop_spinners EXIT
  for ((i = 0; i < $(nproc); ++i)); do
    sh -c 'while :; do :; done' &
    spinners+=($!)
  done
  echo "=== every core kept busy by ${#spinners[@]} spinning processes" >&2
fi

status=0
started=$SECONDS
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

# The developer build is Release (-O3, what a user's build compiles) with warnings as errors.
if wanted build; then run_suite build -DCMAKE_BUILD_TYPE=Release; fi
if wanted user; then
  start=$SECONDS
  echo "=== build-user" >&2
  rc=0
  # What a user types: Release, no developer switch. The library is built and installed, and
  # consumers use it through find_package, pkg-config and add_subdirectory (the package tests).
  # The rest of the tree is built in Release, warnings as errors, by the developer build above.
  { cmake -S . -B build-user -DCMAKE_BUILD_TYPE=Release &&
    cmake --build build-user --target multiproc -j"$(multiproc_jobs)" &&
    ctest --test-dir build-user -L package --output-on-failure; } || rc=$?
  echo "=== build-user: $([[ $rc -eq 0 ]] && echo passed || echo "FAILED ($rc)") in $((SECONDS - start)) s" >&2
  record "$rc"
fi
if wanted asan; then run_suite build-asan -DMULTIPROC_SANITIZE=ON; fi
if wanted tsan; then CC=clang CXX=clang++ run_suite build-tsan -DMULTIPROC_TSAN=ON -DCMAKE_CXX_COMPILER=clang++; fi
if wanted fuzz; then
  start=$SECONDS
  echo "=== build-fuzz" >&2
  rc=0
  scripts/fuzz.sh || rc=$?
  echo "=== build-fuzz: $([[ $rc -eq 0 ]] && echo passed || echo "FAILED ($rc)") in $((SECONDS - start)) s" >&2
  record "$rc"
fi
echo "=== all: $([[ $status -eq 0 ]] && echo passed || echo "FAILED ($status)") in $((SECONDS - started)) s" >&2
exit "$status"
