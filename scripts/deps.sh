# shellcheck shell=bash
# Shared by scripts/test.sh and scripts/demo.sh: the Debian packages multiproc needs, installed
# when missing, and the one way the build directories are configured. Source it; do not run it.

# Everything a fresh Debian/Ubuntu machine needs to build, test and benchmark multiproc.
MULTIPROC_PACKAGES=(
  cmake
  g++
  clang
  libclang-rt-14-dev   # clang's sanitizer runtimes (the TSan build uses clang)
  libgtest-dev
  libgmock-dev
  libbenchmark-dev
  libcereal-dev
  libcli11-dev
  libopenmpi-dev       # multiproc::mpi, the Pool over MPI ranks, and its tests
  openmpi-bin
  iproute2             # ip netns: the MPI test with one rank per network namespace
  pkg-config
  python3
)

# Installs whichever of MULTIPROC_PACKAGES are missing, with apt-get (through sudo when not root).
multiproc_install_deps() {
  local missing=() pkg
  for pkg in "${MULTIPROC_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
      missing+=("$pkg")
    fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    return 0
  fi

  echo "multiproc: installing missing packages: ${missing[*]}" >&2
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "multiproc: not root and sudo is not available; install these packages: ${missing[*]}" >&2
      return 1
    fi
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"
}

# multiproc_configure BUILD_DIR [CMAKE_ARGS...]: configures a developer build (warnings as errors)
# of the repository in BUILD_DIR. Run from the repository root.
multiproc_configure() {
  local build_dir=$1
  shift
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMULTIPROC_DEVELOPER=ON "$@"
}

# multiproc_jobs: how many compile jobs to run at once.
multiproc_jobs() {
  nproc 2>/dev/null || echo 2
}
