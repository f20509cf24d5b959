#!/usr/bin/env bash
# Installs what `--features mpi` builds and runs with on Debian or Ubuntu: OpenMPI (mpirun and
# its headers), pkg-config to find it, and libclang for the bindings' generator. Run as root, or
# with sudo on the PATH. `.ci/run` calls it before the data-parallel tests.
set -euo pipefail
need=()
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin)
dpkg -s libopenmpi-dev >/dev/null 2>&1 || need+=(libopenmpi-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -eq 0 ]; then
  echo "install-mpi: OpenMPI, pkg-config and libclang are installed"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-mpi: installing ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
mpirun --version | head -1
