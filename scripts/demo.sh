#!/usr/bin/env bash
# Builds multiproc and runs its flagship example, examples/seed_demo: scripts/demo.sh [ARGS...]
#
# Installs the Debian packages it needs when they are missing, configures the same build as
# scripts/test.sh in build/, builds the example and runs it with ARGS (try --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/deps.sh
source scripts/deps.sh

multiproc_install_deps
multiproc_configure build
cmake --build build -j"$(multiproc_jobs)" --target seed_demo
exec build/examples/seed_demo "$@"
