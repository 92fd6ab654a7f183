#!/usr/bin/env bash
# The subproject test (CTest: package.add_subdirectory_consumer): builds tests/package/subproject,
# which takes multiproc in with add_subdirectory, in Release with default options, and runs it.
#
#   run_subproject.sh SOURCE_DIR WORK_DIR CXX
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 SOURCE_DIR WORK_DIR CXX" >&2
  exit 2
fi
source_dir=$1
work_dir=$2
cxx=$3

rm -rf -- "$work_dir"
cmake -S "$source_dir/tests/package/subproject" -B "$work_dir" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$cxx" -DMULTIPROC_SOURCE_DIR="$source_dir"
cmake --build "$work_dir" -j"$(nproc 2>/dev/null || echo 2)"
"$work_dir/consumer"
echo "=== subproject test passed"
